//! MLIR to PTX with MLIR's own pass pipeline, through melior: SCF to control flow, vectors
//! and GPU ops to the NVVM/LLVM dialects, then `gpu-module-to-binary` in ISA form, whose
//! `assembly` string is the PTX for sm_90a.
//!
//! Every dialect and pass is registered, not only the ones the kernels use (a departure from
//! DESIGN.md, measured): MLIR's C API attaches the conversion-to-LLVM interfaces of the
//! dialects and the serialisation of `#nvvm.target` only through `registerAllDialects` (its
//! extensions). Registering just the nine dialects and five passes used (through mlir-sys's
//! dialect handles) made the binary 83 MB instead of 243 MB, but `convert-gpu-to-nvvm` then
//! left block arguments unconverted ("type mismatch for bb argument"), and a pipeline with the
//! explicit conversions instead (`convert-cf-to-llvm`, `convert-arith-to-llvm`, …, registered
//! through mlir-sys) did not build ("failed to add `convert-cf-to-llvm`"). Left for later.

use melior::dialect::DialectRegistry;
use melior::ir::operation::OperationPrintingFlags;
use melior::ir::Module;
use melior::pass::{PassIrPrintingOptions, PassManager};
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::Context;
use std::sync::Once;

/// The pipeline from a kernel's `gpu.module` to PTX.
pub const PIPELINE: &str = "builtin.module(gpu.module(convert-scf-to-cf,convert-vector-to-llvm,convert-gpu-to-nvvm,reconcile-unrealized-casts),gpu-module-to-binary{format=isa})";

/// An MLIR context ready to lower kernels.
pub struct Lowering {
    context: Context,
}

impl Default for Lowering {
    fn default() -> Self {
        static PASSES: Once = Once::new();
        PASSES.call_once(register_all_passes);
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        let context = Context::new();
        context.append_dialect_registry(&registry);
        context.load_all_available_dialects();
        register_all_llvm_translations(&context);
        Lowering { context }
    }
}

impl Lowering {
    /// PTX of a module holding one `gpu.module`; with `print_after_all`, the IR after each pass
    /// goes to standard error.
    pub fn ptx(&self, mlir: &str, print_after_all: bool) -> Result<String, String> {
        let mut module = Module::parse(&self.context, mlir).ok_or("the generated MLIR does not parse")?;
        let pm = PassManager::new(&self.context);
        if print_after_all {
            pm.enable_ir_printing(&PassIrPrintingOptions {
                before_all: false,
                after_all: true,
                module_scope: true,
                on_change: false,
                on_failure: true,
                flags: OperationPrintingFlags::new(),
                tree_printing_path: std::path::PathBuf::new(),
            });
        }
        parse_pass_pipeline(pm.as_operation_pass_manager(), PIPELINE).map_err(|e| format!("pass pipeline: {e}"))?;
        pm.run(&mut module).map_err(|e| format!("lowering failed: {e}"))?;
        let text = module.as_operation().to_string();
        assembly(&text).ok_or_else(|| "no PTX in the lowered module".to_string())
    }
}

/// The `assembly = "..."` string of a printed `gpu.binary`, unescaped (`\XX` is a hex byte).
fn assembly(printed: &str) -> Option<String> {
    let start = printed.find("assembly = \"")? + "assembly = \"".len();
    let bytes = &printed.as_bytes()[start..];
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return String::from_utf8(out).ok(),
            b'\\' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_kernel_lowers_to_ptx() {
        let mlir = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/quant_fp8.mlir"))
            .expect("reference kernel");
        let ptx = Lowering::default().ptx(&mlir, false).expect("lowers");
        assert!(ptx.contains(".target sm_90a") && ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), "{ptx}");
    }

    #[test]
    fn escapes_are_decoded() {
        assert_eq!(assembly(r#"x assembly = "a\0Ab\22" y"#).as_deref(), Some("a\nb\""));
    }
}
