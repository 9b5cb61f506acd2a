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

/// The XCR0 value a vCPU starts with: every user state component CPUID leaf
/// 0xD.0 offers (EDX:EAX), or `None` without that leaf.
///
/// Architecturally XCR0 starts at 1 (x87 only) and the guest enables the
/// rest with XSETBV, which KVM intercepts to keep its copy of XCR0. Nested
/// under QEMU TCG, the emulated SVM runs XSETBV without the intercept, so
/// KVM's copy stays at 1: CPUID 0xD.0 EBX (which KVM computes from its copy)
/// then gives the size of the x87/SSE area while the sub-leaves place AVX
/// and PKRU further out, and KVM loads its stale XCR0 at every VM entry.
/// Linux 6.12 warns and turns XSAVE off; Linux 7.x panics in
/// `fpu__init_system`. Starting from the value Linux writes anyway keeps
/// the two copies equal; where XSETBV is intercepted (hardware), the
/// guest's own write simply replaces it.
pub fn initial_xcr0(cpuid: &CpuId) -> Option<u64> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| (e.eax as u64 | (e.edx as u64) << 32) | XCR0_X87)
}

/// XCR0 bit 0: x87 state, always enabled.
const XCR0_X87: u64 = 1;

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

    #[test]
    fn initial_xcr0_is_every_offered_user_component() {
        let leaf = |function, index, eax, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            edx,
            ..Default::default()
        };
        let c = CpuId::from_entries(&[leaf(0xd, 1, 0xf, 0), leaf(0xd, 0, 0x207, 0)]).unwrap();
        assert_eq!(initial_xcr0(&c), Some(0x207));
        let c = CpuId::from_entries(&[leaf(0xd, 0, 0x6, 0x1)]).unwrap();
        assert_eq!(initial_xcr0(&c), Some((1 << 32) | 0x7));
        let c = CpuId::from_entries(&[leaf(1, 0, 0x207, 0)]).unwrap();
        assert_eq!(initial_xcr0(&c), None);
    }
}
