//! Loading a Linux bzImage with the 64-bit boot protocol: kernel, initramfs,
//! command line, zero page with the e820 map, identity page tables, GDT and
//! the boot vCPU's registers.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use thiserror::Error;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};
use vm_migration::GuestMemoryMmap;

use super::layout::*;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load kernel image {path} (only bzImage with the 64-bit boot protocol is supported): {source}")]
    LoadKernel {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitramfs {
        path: String,
        source: std::io::Error,
    },
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitramfsTooLarge { size: u64, limit: u64 },
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    #[error("kernel does not support the 64-bit entry point (boot protocol {0:#x})")]
    No64BitEntry(u16),
    #[error("cannot write boot structures into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// loadflags: the kernel may use the heap given by heap_end_ptr.
const CAN_USE_HEAP: u8 = 0x80;
/// xloadflags: kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

/// What the boot vCPU needs to start the kernel.
#[derive(Clone, Copy, Debug)]
pub struct EntryPoint {
    pub entry: GuestAddress,
}

/// The zero page as written to guest memory (only ever used as bytes).
#[derive(Clone, Copy, Default)]
struct ZeroPage(#[allow(dead_code)] boot_params);

// SAFETY: boot_params is a plain-old-data C structure made of integers and
// arrays of integers; every bit pattern is valid and it has no padding that
// the kernel interprets.
unsafe impl ByteValued for ZeroPage {}

/// One line of the e820 map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map: RAM below the EBDA, the EBDA..1 MiB area reserved (it holds
/// the ACPI tables), RAM from 1 MiB, the ECAM window reserved, RAM above
/// 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_RAM_START.raw_value() - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_ranges(mem_size) {
        let (start, size) = if start.raw_value() == 0 {
            (
                HIGH_RAM_START.raw_value(),
                size - HIGH_RAM_START.raw_value(),
            )
        } else {
            (start.raw_value(), size)
        };
        map.push(E820Entry {
            addr: start,
            size,
            kind: E820_RAM,
        });
    }
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    map
}

/// Loads `kernel`, `initramfs` and `cmdline` and writes the zero page, page
/// tables and GDT. Returns the 64-bit entry point.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<EntryPoint, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.display().to_string(),
        source,
    })?;
    let loaded = BzImage::load(mem, None, &mut file, Some(HIGH_RAM_START)).map_err(|source| {
        BootError::LoadKernel {
            path: kernel.display().to_string(),
            source,
        }
    })?;
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    let xloadflags = params.hdr.xloadflags;
    if params.hdr.header != KERNEL_HDR_MAGIC || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry(params.hdr.version));
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;

    let bytes = cmdline.as_bytes();
    if bytes.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(bytes.len()));
    }
    mem.write_slice(bytes, CMDLINE_START)?;
    mem.write_obj(0u8, CMDLINE_START.unchecked_add(bytes.len() as u64))?;
    params.hdr.cmd_line_ptr = CMDLINE_START.raw_value() as u32;
    params.hdr.cmdline_size = bytes.len() as u32 + 1;

    if let Some(path) = initramfs {
        let data = std::fs::read(path).map_err(|source| BootError::ReadInitramfs {
            path: path.display().to_string(),
            source,
        })?;
        let low_ram_end = mem_size.min(MEM_32BIT_RESERVED_START);
        let limit = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => m as u64,
        }
        .min(low_ram_end - 1);
        let size = data.len() as u64;
        let kernel_end = loaded.kernel_load.raw_value() + loaded.kernel_end;
        let addr = (limit + 1)
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end)
            .ok_or(BootError::InitramfsTooLarge { size, limit })?;
        mem.write_slice(&data, GuestAddress(addr))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = e820_map(mem_size);
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = ACPI_START.raw_value();

    mem.write_obj(ZeroPage(params), ZERO_PAGE_START)?;
    mem.write_slice(&RESET_VECTOR_STUB, GuestAddress(RESET_VECTOR))?;
    write_page_tables(mem)?;
    write_gdt(mem)?;

    Ok(EntryPoint {
        entry: loaded.kernel_load.unchecked_add(0x200),
    })
}

/// Where a CPU starts after a reset (F000:FFF0), and where Linux jumps when
/// it reboots through the BIOS.
pub const RESET_VECTOR: u64 = 0xffff0;

/// There is no BIOS: the reset vector holds a stub that writes the ACPI
/// reset register, so every reboot method of Linux ends the VM.
/// `mov dx, 0x3c1; mov al, 1; out dx, al; hlt; jmp hlt`.
const RESET_VECTOR_STUB: [u8; 9] = [
    0xba,
    (ACPI_RESET_PORT & 0xff) as u8,
    (ACPI_RESET_PORT >> 8) as u8,
    0xb0,
    ACPI_RESET_VALUE,
    0xee,
    0xf4,
    0xeb,
    0xfd,
];

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    // PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries map 2 MiB each.
    mem.write_obj(PDPTE_START.raw_value() | 0x3, PML4_START)?;
    for i in 0..4u64 {
        let pd = PDE_START.raw_value() + i * 0x1000;
        mem.write_obj(pd | 0x3, PDPTE_START.unchecked_add(i * 8))?;
        for j in 0..512u64 {
            let phys = ((i << 30) | (j << 21)) | 0x83;
            mem.write_obj(phys, GuestAddress(pd + j * 8))?;
        }
    }
    Ok(())
}

/// GDT entries: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, BOOT_GDT_START.unchecked_add(i as u64 * 8))?;
    }
    Ok(())
}

/// Special registers for 64-bit entry: long mode, paging on, flat segments.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START.raw_value();
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const X86_CR0_PE: u64 = 1;
    const X86_CR0_ET: u64 = 1 << 4;
    const X86_CR0_PG: u64 = 1 << 31;
    const X86_CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START.raw_value();
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers for the 64-bit entry point.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START.raw_value(),
        ..Default::default()
    }
}

/// The FPU state after reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_ecam_and_ebda() {
        let map = e820_map(512 << 20);
        assert!(map.iter().any(|e| e.addr == PCI_ECAM_START
            && e.size == PCI_ECAM_SIZE
            && e.kind == E820_RESERVED));
        assert!(map
            .iter()
            .any(|e| e.addr == EBDA_START && e.kind == E820_RESERVED));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (512 << 20) - (HIGH_RAM_START.raw_value() - EBDA_START));
        // Sorted and not overlapping.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{:?}", w);
        }
        // ACPI tables sit in a reserved range.
        assert!(map.iter().any(|e| e.kind == E820_RESERVED
            && e.addr <= ACPI_START.raw_value()
            && ACPI_START.raw_value() + ACPI_MAX_SIZE <= e.addr + e.size));
    }

    #[test]
    fn e820_above_4g() {
        let map = e820_map(6 << 30);
        assert!(map
            .iter()
            .any(|e| e.addr == RAM_64BIT_START && e.size == (6 << 30) - MEM_32BIT_RESERVED_START));
    }

    #[test]
    fn reset_vector_stub_writes_the_reset_register() {
        // The stub lies in the reserved area below 1 MiB and fits before it.
        const { assert!(RESET_VECTOR >= EBDA_START) };
        assert!(RESET_VECTOR + RESET_VECTOR_STUB.len() as u64 <= HIGH_RAM_START.raw_value());
        assert_eq!(&RESET_VECTOR_STUB[1..3], &0x3c1u16.to_le_bytes());
        assert_eq!(RESET_VECTOR_STUB[4], ACPI_RESET_VALUE);
    }

    #[test]
    fn gdt_code_segment_is_long_mode() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!(ds.db, 1);
        assert_eq!(ds.type_, 3);
    }

    #[test]
    fn page_tables_identity_map() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(PML4_START).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START.raw_value());
        let pd3: u64 = mem.read_obj(PDPTE_START.unchecked_add(24)).unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pd3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (4u64 << 30) - (2 << 20));
        assert_eq!(last & 0x80, 0x80);
    }
}
