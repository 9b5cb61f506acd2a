//! Plain-data state of the virtio-pci transport: the common configuration
//! registers, the negotiated features and every virtqueue's configuration
//! and ring position.
//!
//! [`VirtioPciState`] is what a device-context codec captures from one
//! device ([`super::VirtioPciDevice::state`]) and applies to another
//! ([`super::VirtioPciDevice::set_state`]). [`CommonCfg`] is the 64-byte
//! `struct virtio_pci_common_cfg` (virtio 1.3) as the driver sees it, with
//! byte encoding and decoding.

/// "No vector" for `config_msix_vector` and `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Byte offsets of `struct virtio_pci_common_cfg` (virtio 1.3).
pub mod common_offset {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    pub const QUEUE_RESET: u64 = 0x3a;
    pub const ADMIN_QUEUE_INDEX: u64 = 0x3c;
    pub const ADMIN_QUEUE_NUM: u64 = 0x3e;
}

/// Length of `struct virtio_pci_common_cfg` as of virtio 1.3.
pub const COMMON_CFG_LEN: usize = 64;

/// Configuration and ring position of one virtqueue.
///
/// `next_avail` / `next_used` are the device's positions in the available
/// and used rings (the device's "last avail index" and its used index);
/// they are meaningful while the queue is enabled and 0 otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfigState {
    /// `queue_size`.
    pub size: u16,
    /// `queue_msix_vector`.
    pub msix_vector: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// `queue_reset` reads 1: the queue was reset on its own and is not
    /// re-enabled yet.
    pub reset: bool,
    /// `queue_desc`: descriptor table address.
    pub desc_table: u64,
    /// `queue_driver`: available ring address.
    pub avail_ring: u64,
    /// `queue_device`: used ring address.
    pub used_ring: u64,
    /// Next available ring entry the device will take.
    pub next_avail: u16,
    /// Next used ring entry the device will write.
    pub next_used: u16,
}

impl QueueConfigState {
    /// The state of a queue after device or queue reset: size = maximum,
    /// no vector, disabled, zero addresses.
    pub fn reset_value(max_size: u16) -> Self {
        QueueConfigState {
            size: max_size,
            msix_vector: VIRTIO_MSI_NO_VECTOR,
            enabled: false,
            reset: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: 0,
            next_used: 0,
        }
    }
}

/// The whole virtio state of the transport.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// The feature bits the driver wrote (both halves). Once
    /// `FEATURES_OK` is set these are the negotiated features.
    pub driver_features: u64,
    /// `config_msix_vector`.
    pub config_msix_vector: u16,
    /// `device_status`.
    pub device_status: u8,
    /// `config_generation`.
    pub config_generation: u8,
    /// `queue_select`.
    pub queue_select: u16,
    /// Interrupt status (ISR) bits not yet read by the driver.
    pub isr: u8,
    /// Every queue: device-type queues first, then admin queues.
    pub queues: Vec<QueueConfigState>,
}

impl VirtioPciState {
    /// The state after device reset for queues of `max_sizes`.
    pub fn reset_value(max_sizes: &[u16]) -> Self {
        VirtioPciState {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: VIRTIO_MSI_NO_VECTOR,
            device_status: 0,
            config_generation: 0,
            queue_select: 0,
            isr: 0,
            queues: max_sizes
                .iter()
                .map(|&m| QueueConfigState::reset_value(m))
                .collect(),
        }
    }

    /// The negotiated features: the driver's features once `FEATURES_OK`
    /// is set, else 0.
    pub fn negotiated_features(&self) -> u64 {
        if self.device_status & STATUS_FEATURES_OK != 0 {
            self.driver_features
        } else {
            0
        }
    }

    /// Whether the driver set `DRIVER_OK`.
    pub fn driver_ok(&self) -> bool {
        self.device_status & STATUS_DRIVER_OK != 0
    }

    /// The queue `queue_select` designates, if it exists.
    pub fn selected_queue(&self) -> Option<&QueueConfigState> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Takes the device-wide writable fields of a common configuration
    /// image: both feature selects, `config_msix_vector`, `device_status`,
    /// `config_generation` and `queue_select`. The 32-bit
    /// `driver_feature` window, the read-only fields and the per-queue
    /// window are not taken (features and queues travel whole, in
    /// `driver_features` and `queues`).
    pub fn set_common(&mut self, c: &CommonCfg) {
        self.device_feature_select = c.device_feature_select;
        self.driver_feature_select = c.driver_feature_select;
        self.config_msix_vector = c.config_msix_vector;
        self.device_status = c.device_status;
        self.config_generation = c.config_generation;
        self.queue_select = c.queue_select;
    }
}

/// `struct virtio_pci_common_cfg` (virtio 1.3, 64 bytes) as the driver
/// reads it. The per-queue fields are those of the queue `queue_select`
/// designates (zero if it designates none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommonCfg {
    pub device_feature_select: u32,
    pub device_feature: u32,
    pub driver_feature_select: u32,
    pub driver_feature: u32,
    pub config_msix_vector: u16,
    pub num_queues: u16,
    pub device_status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub queue_size: u16,
    pub queue_msix_vector: u16,
    pub queue_enable: u16,
    pub queue_notify_off: u16,
    pub queue_desc: u64,
    pub queue_driver: u64,
    pub queue_device: u64,
    pub queue_notify_data: u16,
    pub queue_reset: u16,
    pub admin_queue_index: u16,
    pub admin_queue_num: u16,
}

impl CommonCfg {
    /// The little-endian byte image.
    pub fn to_bytes(&self) -> [u8; COMMON_CFG_LEN] {
        use common_offset::*;
        let mut b = [0u8; COMMON_CFG_LEN];
        fn put(b: &mut [u8], off: u64, v: &[u8]) {
            let o = off as usize;
            b[o..o + v.len()].copy_from_slice(v);
        }
        put(
            &mut b,
            DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(&mut b, DEVICE_FEATURE, &self.device_feature.to_le_bytes());
        put(
            &mut b,
            DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(&mut b, DRIVER_FEATURE, &self.driver_feature.to_le_bytes());
        put(
            &mut b,
            CONFIG_MSIX_VECTOR,
            &self.config_msix_vector.to_le_bytes(),
        );
        put(&mut b, NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(&mut b, DEVICE_STATUS, &[self.device_status]);
        put(&mut b, CONFIG_GENERATION, &[self.config_generation]);
        put(&mut b, QUEUE_SELECT, &self.queue_select.to_le_bytes());
        put(&mut b, QUEUE_SIZE, &self.queue_size.to_le_bytes());
        put(
            &mut b,
            QUEUE_MSIX_VECTOR,
            &self.queue_msix_vector.to_le_bytes(),
        );
        put(&mut b, QUEUE_ENABLE, &self.queue_enable.to_le_bytes());
        put(
            &mut b,
            QUEUE_NOTIFY_OFF,
            &self.queue_notify_off.to_le_bytes(),
        );
        put(&mut b, QUEUE_DESC, &self.queue_desc.to_le_bytes());
        put(&mut b, QUEUE_DRIVER, &self.queue_driver.to_le_bytes());
        put(&mut b, QUEUE_DEVICE, &self.queue_device.to_le_bytes());
        put(
            &mut b,
            QUEUE_NOTIFY_DATA,
            &self.queue_notify_data.to_le_bytes(),
        );
        put(&mut b, QUEUE_RESET, &self.queue_reset.to_le_bytes());
        put(
            &mut b,
            ADMIN_QUEUE_INDEX,
            &self.admin_queue_index.to_le_bytes(),
        );
        put(&mut b, ADMIN_QUEUE_NUM, &self.admin_queue_num.to_le_bytes());
        b
    }

    /// Decodes a little-endian byte image.
    pub fn from_bytes(b: &[u8; COMMON_CFG_LEN]) -> Self {
        use common_offset::*;
        let u16_at = |o: u64| u16::from_le_bytes([b[o as usize], b[o as usize + 1]]);
        let u32_at = |o: u64| {
            let o = o as usize;
            u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
        };
        let u64_at = |o: u64| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        CommonCfg {
            device_feature_select: u32_at(DEVICE_FEATURE_SELECT),
            device_feature: u32_at(DEVICE_FEATURE),
            driver_feature_select: u32_at(DRIVER_FEATURE_SELECT),
            driver_feature: u32_at(DRIVER_FEATURE),
            config_msix_vector: u16_at(CONFIG_MSIX_VECTOR),
            num_queues: u16_at(NUM_QUEUES),
            device_status: b[DEVICE_STATUS as usize],
            config_generation: b[CONFIG_GENERATION as usize],
            queue_select: u16_at(QUEUE_SELECT),
            queue_size: u16_at(QUEUE_SIZE),
            queue_msix_vector: u16_at(QUEUE_MSIX_VECTOR),
            queue_enable: u16_at(QUEUE_ENABLE),
            queue_notify_off: u16_at(QUEUE_NOTIFY_OFF),
            queue_desc: u64_at(QUEUE_DESC),
            queue_driver: u64_at(QUEUE_DRIVER),
            queue_device: u64_at(QUEUE_DEVICE),
            queue_notify_data: u16_at(QUEUE_NOTIFY_DATA),
            queue_reset: u16_at(QUEUE_RESET),
            admin_queue_index: u16_at(ADMIN_QUEUE_INDEX),
            admin_queue_num: u16_at(ADMIN_QUEUE_NUM),
        }
    }
}

/// Why a [`VirtioPciState`] cannot be applied to a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("state has {got} queues, the device has {expected}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {index}: size {size} is not a power of two in 1..={max}")]
    QueueSize { index: usize, size: u16, max: u16 },
    #[error("queue {index}: ring address {addr:#x} breaks its alignment")]
    RingAlignment { index: usize, addr: u64 },
    #[error("features {0:#x} are not offered by this device")]
    Features(u64),
    #[error("MSI-X vector {vector} is out of range (the function has {count})")]
    Vector { vector: u16, count: u16 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_cfg_round_trip() {
        let c = CommonCfg {
            device_feature_select: 1,
            device_feature: 0x8000_0001,
            driver_feature_select: 0x11223344,
            driver_feature: 0x55667788,
            config_msix_vector: 3,
            num_queues: 2,
            device_status: 0xf,
            config_generation: 9,
            queue_select: 1,
            queue_size: 128,
            queue_msix_vector: 4,
            queue_enable: 1,
            queue_notify_off: 1,
            queue_desc: 0x1_2345_6000,
            queue_driver: 0x2000,
            queue_device: 0x3000,
            queue_notify_data: 1,
            queue_reset: 0,
            admin_queue_index: 1,
            admin_queue_num: 1,
        };
        let b = c.to_bytes();
        assert_eq!(b[0x14], 0xf);
        assert_eq!(&b[0x3c..0x40], &[1, 0, 1, 0]);
        assert_eq!(&b[0x20..0x28], &0x1_2345_6000u64.to_le_bytes());
        assert_eq!(CommonCfg::from_bytes(&b), c);
    }
}
