//! With the `cuda` feature, compiles `kernels/model.cu` to PTX with nvcc (CUDA_ROOT/bin or
//! PATH); the driver JIT-compiles it for the GPU it finds. Without the feature: nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels/model.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("model.ptx");
    // bf16 conversions are native from compute capability 8.0; older GPUs are not a target.
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim().parse::<u32>().ok())
        .unwrap_or(80);
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|r| PathBuf::from(r).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("kernels/model.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e} (see scripts/build-cuda)", nvcc.display()));
    assert!(status.success(), "nvcc failed on kernels/model.cu");
}
