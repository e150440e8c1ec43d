//! Checks on the compiled eBPF object itself (no root needed).
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
use redirector::datapath::EBPF_OBJECT;

/// The programs never call compiler-builtins' `memcpy` / `memmove` / `memset` / `memcmp`:
/// in BPF those are byte-at-a-time loops linked in as subprograms, hundreds of
/// instructions per packet for one 56-byte copy. LLVM emits them when a struct is copied
/// through a pointer it cannot prove distinct, or zeroed in place; plain by-value copies
/// are lowered to a few loads and stores. (A regression here once added ~100 ns to every
/// tc ingress run in real traffic.)
#[test]
fn no_mem_calls_in_programs() {
    let obj = object::File::parse(EBPF_OBJECT).expect("parsing the eBPF object");
    let mut calls = Vec::new();
    let mut program_sections = 0;
    for section in obj.sections() {
        let name = section.name().unwrap_or("");
        if !(name.starts_with("classifier") || name.starts_with("xdp")) {
            continue;
        }
        program_sections += 1;
        for (offset, rel) in section.relocations() {
            let RelocationTarget::Symbol(idx) = rel.target() else {
                continue;
            };
            let Ok(sym) = obj.symbol_by_index(idx) else {
                continue;
            };
            let sym = sym.name().unwrap_or("");
            if matches!(sym, "memcpy" | "memmove" | "memset" | "memcmp") {
                calls.push(format!("{name}+{offset:#x}: {sym}"));
            }
        }
    }
    assert!(program_sections >= 2, "no program sections found");
    assert!(calls.is_empty(), "mem* calls in the programs: {calls:#?}");
}
