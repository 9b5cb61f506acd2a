//! Per-vCPU CPUID, derived from what KVM supports.

use kvm_bindings::CpuId;

/// CPUID leaf 1 ECX bit 31: running under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// CPUID leaf 1 ECX bit 24: TSC deadline timer (KVM emulates it with the
/// in-kernel local APIC).
const TSC_DEADLINE_BIT: u32 = 1 << 24;

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`: APIC IDs in
/// leaves 1, 0xB and 0x1F, logical processor count, the hypervisor bit.
/// KVM's own leaves (0x4000_0000..) stay as reported, so the guest finds
/// kvm-clock.
pub fn adjust(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                e.ecx |= HYPERVISOR_BIT | TSC_DEADLINE_BIT;
                // HTT: more than one logical processor in the package.
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => {
                e.edx = id as u32;
                match e.index {
                    // SMT level: one thread per core.
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    // Core level: all vCPUs in one package.
                    1 => {
                        e.eax = bits_for(count);
                        e.ebx = count as u32;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Bits of APIC ID needed to number `count` processors.
fn bits_for(count: u8) -> u32 {
    let mut b = 0;
    while (1u32 << b) < count as u32 {
        b += 1;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_topology() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xdead_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        adjust(&mut c, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800);
        assert_ne!(s[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[1].eax, 2);
        assert_eq!(s[1].ebx, 4);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(5), 3);
    }
}
