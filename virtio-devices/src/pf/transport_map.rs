//! Mapping between the virtio-pci transport's plain state
//! ([`VirtioPciState`], its common configuration image) and a member's
//! [`MemberContext`]: the small adapter a VF's [`super::MemberDevice`]
//! implementation uses in `capture_context` / `apply_context`.
//!
//! The context carries, per queue, the device's next available index but
//! not its used index: on apply the used index is taken from the used ring
//! in guest memory (`used->idx`, which the device keeps current), through
//! the `used_idx` callback.

use crate::transport::state::{QueueConfigState, VirtioPciState};

use super::context::{CommonCfg, MemberContext, QueueContext};

/// Errors mapping a context onto transport state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// A queue index beyond the transport's queues.
    #[error("context names queue {index}, the transport has {queues} device queues")]
    QueueIndex {
        /// Index in the context.
        index: u16,
        /// Device queues of the transport.
        queues: usize,
    },
    /// The used index of an enabled queue could not be read.
    #[error("cannot read the used index of queue {index} at {used_ring:#x}")]
    UsedIndex {
        /// Queue index.
        index: u16,
        /// Used ring address.
        used_ring: u64,
    },
}

/// Build a member context from transport state.
///
/// * `common`: the common configuration image as the driver reads it now
///   (`VirtioPciDevice::common_cfg`);
/// * `num_device_queues`: queues of the device type (admin queues, which a
///   member does not have, are not part of the context);
/// * `device_owned`: per queue, heads taken and not completed (R-MODE-3);
/// * `device_config`: the device-type configuration bytes.
pub fn context_from_transport(
    st: &VirtioPciState,
    common: &CommonCfg,
    num_device_queues: u16,
    device_owned: &[Vec<u16>],
    device_config: Vec<u8>,
) -> MemberContext {
    let queues = st
        .queues
        .iter()
        .take(usize::from(num_device_queues))
        .enumerate()
        .map(|(i, q)| QueueContext {
            index: i as u16,
            size: q.size,
            msix_vector: q.msix_vector,
            desc: q.desc_table,
            driver: q.avail_ring,
            device: q.used_ring,
            avail_idx: if q.enabled { q.next_avail } else { 0 },
            enabled: q.enabled,
            device_owned: device_owned.get(i).cloned().unwrap_or_default(),
            avail_follows_used: false,
        })
        .collect();
    MemberContext {
        common: Some(*common),
        // The bits the driver wrote: the negotiated features once
        // FEATURES_OK is set (spec §4.3 [resolved]), and what a destination
        // needs to carry on a negotiation in progress otherwise.
        features: Some(st.driver_features),
        queues,
        device_config: Some(device_config),
    }
}

/// What applying a context to a transport needs besides its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedContext {
    /// The transport state to set (`VirtioPciDevice::set_state`).
    pub state: VirtioPciState,
    /// Per device queue, the heads to process again on resume.
    pub device_owned: Vec<Vec<u16>>,
    /// Device configuration bytes, if the context carried them.
    pub device_config: Option<Vec<u8>>,
}

/// Build transport state from a (validated) member context. Fields the
/// context lacks take their reset values; `max_sizes` lists every queue of
/// the transport (device queues first). `used_idx(used_ring)` reads
/// `used->idx` from guest memory for enabled queues.
pub fn transport_from_context(
    ctx: &MemberContext,
    max_sizes: &[u16],
    mut used_idx: impl FnMut(u64) -> Option<u16>,
) -> Result<AppliedContext, MapError> {
    let mut st = VirtioPciState::reset_value(max_sizes);
    if let Some(c) = &ctx.common {
        st.set_common(c);
    }
    st.driver_features = ctx.features.unwrap_or(0);
    let mut device_owned = vec![Vec::new(); max_sizes.len()];
    for q in &ctx.queues {
        let i = usize::from(q.index);
        let slot = st.queues.get_mut(i).ok_or(MapError::QueueIndex {
            index: q.index,
            queues: max_sizes.len(),
        })?;
        let next_used = if q.enabled {
            used_idx(q.device).ok_or(MapError::UsedIndex {
                index: q.index,
                used_ring: q.device,
            })?
        } else {
            0
        };
        *slot = QueueConfigState {
            size: q.size,
            msix_vector: q.msix_vector,
            enabled: q.enabled,
            reset: false,
            desc_table: q.desc,
            avail_ring: q.driver,
            used_ring: q.device,
            next_avail: match (q.enabled, q.avail_follows_used) {
                (false, _) => 0,
                (true, true) => next_used,
                (true, false) => q.avail_idx,
            },
            next_used,
        };
        device_owned[i] = q.device_owned.clone();
    }
    Ok(AppliedContext {
        state: st,
        device_owned,
        device_config: ctx.device_config.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VirtioPciState {
        let mut st = VirtioPciState::reset_value(&[256, 128]);
        st.driver_features = (1 << 32) | (1 << 9);
        st.device_status = 0xf;
        st.config_msix_vector = 0;
        st.queue_select = 1;
        st.config_generation = 3;
        st.queues[0] = QueueConfigState {
            size: 128,
            msix_vector: 1,
            enabled: true,
            reset: false,
            desc_table: 0x10_0000,
            avail_ring: 0x10_1000,
            used_ring: 0x10_2000,
            next_avail: 77,
            next_used: 70,
        };
        st
    }

    fn common(st: &VirtioPciState) -> CommonCfg {
        CommonCfg {
            device_feature_select: st.device_feature_select,
            driver_feature_select: st.driver_feature_select,
            config_msix_vector: st.config_msix_vector,
            num_queues: 2,
            device_status: st.device_status,
            config_generation: st.config_generation,
            queue_select: st.queue_select,
            queue_size: 128,
            ..Default::default()
        }
    }

    #[test]
    fn r_ctx_7_transport_state_round_trips_through_a_context() {
        let st = state();
        let owned = vec![vec![3, 9], vec![]];
        let ctx = context_from_transport(&st, &common(&st), 2, &owned, vec![7; 60]);
        assert_eq!(ctx.queues.len(), 2);
        assert_eq!(ctx.queues[0].avail_idx, 77);
        assert_eq!(ctx.features, Some((1 << 32) | (1 << 9)));
        // Through the wire format and back.
        let limits = crate::pf::context::ContextLimits {
            num_queues: 2,
            max_queue_size: 256,
            offered_features: u64::MAX,
            device_cfg_len: 60,
            msix_vectors: 3,
        };
        let ctx = MemberContext::decode(&ctx.to_bytes(), &limits).unwrap();
        let applied = transport_from_context(&ctx, &[256, 128], |used| {
            assert_eq!(used, 0x10_2000);
            Some(70)
        })
        .unwrap();
        assert_eq!(applied.state, st);
        assert_eq!(applied.device_owned, owned);
        assert_eq!(applied.device_config, Some(vec![7; 60]));
    }

    #[test]
    fn missing_fields_take_reset_values() {
        let applied =
            transport_from_context(&MemberContext::default(), &[256, 128], |_| None).unwrap();
        assert_eq!(applied.state, VirtioPciState::reset_value(&[256, 128]));
        let mut ctx = MemberContext::default();
        ctx.queues.push(QueueContext {
            index: 2,
            ..Default::default()
        });
        assert!(matches!(
            transport_from_context(&ctx, &[256, 128], |_| None),
            Err(MapError::QueueIndex { index: 2, .. })
        ));
        ctx.queues[0].index = 0;
        ctx.queues[0].enabled = true;
        ctx.queues[0].size = 16;
        assert!(matches!(
            transport_from_context(&ctx, &[256, 128], |_| None),
            Err(MapError::UsedIndex { index: 0, .. })
        ));
    }
}
