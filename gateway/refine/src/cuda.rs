//! The crate's own CUDA kernels (`kernels/fused.cu`, built to PTX by `build.rs`), as candle
//! custom ops.
//!
//! On an H100 in f16, Nsight Compute put 70% of a 16-row UNet call's kernel time in candle
//! 0.11.1's generic kernels: `im2col_f16` 23.5%, `softmax_f16` 22%, the strided broadcast adds
//! and multiplies (`badd_f16`, `bmul_f16`: biases, the time embedding, GroupNorm's affine map)
//! 27%, GroupNorm's f32 statistics 7% (docs/benchmarks.md, "Gateway on a GPU"). Each kernel
//! here does one of those in one pass with 32-bit index arithmetic, computing in f32.
//!
//! Every function answers `Ok(None)` where its kernel does not apply (not a CUDA tensor, a dtype
//! other than f16/f32, a non-contiguous input, more than `u32::MAX` elements, or the kernel
//! switched off), and the caller then takes candle's path. `DIFFUSIONX_CUDA_KERNELS` switches
//! kernels off for comparisons: `none`, or a comma-separated list of those to keep
//! (`add,group_norm,geglu,im2col,softmax`); unset keeps all.

#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    bail,
};
use half::f16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "diffusionx_refine_fused";

/// The kernels, by the names `DIFFUSIONX_CUDA_KERNELS` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Add,
    GroupNorm,
    Geglu,
    Im2col,
    Softmax,
}

impl Kernel {
    const ALL: [Kernel; 5] = [
        Kernel::Add,
        Kernel::GroupNorm,
        Kernel::Geglu,
        Kernel::Im2col,
        Kernel::Softmax,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::Add => "add",
            Kernel::GroupNorm => "group_norm",
            Kernel::Geglu => "geglu",
            Kernel::Im2col => "im2col",
            Kernel::Softmax => "softmax",
        }
    }

    /// Whether `DIFFUSIONX_CUDA_KERNELS` keeps this kernel.
    pub(crate) fn enabled(self) -> bool {
        static KEPT: OnceLock<Vec<Kernel>> = OnceLock::new();
        KEPT.get_or_init(|| kept(std::env::var("DIFFUSIONX_CUDA_KERNELS").ok().as_deref()))
            .contains(&self)
    }
}

/// The kernels a `DIFFUSIONX_CUDA_KERNELS` value keeps (`None`: unset, all).
fn kept(value: Option<&str>) -> Vec<Kernel> {
    match value {
        None => Kernel::ALL.to_vec(),
        Some(list) => Kernel::ALL
            .into_iter()
            .filter(|k| list.split(',').any(|name| name.trim() == k.name()))
            .collect(),
    }
}

/// Whether `xs` can go to `kernel`: on a CUDA device, f16 or f32, contiguous, 32-bit indexable.
fn applies(kernel: Kernel, xs: &Tensor) -> bool {
    xs.device().is_cuda()
        && matches!(xs.dtype(), DType::F16 | DType::F32)
        && xs.is_contiguous()
        && xs.elem_count() < u32::MAX as usize
        && kernel.enabled()
}

fn u32_of(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{n} exceeds u32")))
}

/// `xs + v[(i / inner) % period]` for every flat index `i` of `xs`.
pub(crate) fn add_broadcast(
    xs: &Tensor,
    v: &Tensor,
    inner: usize,
    period: usize,
) -> Result<Option<Tensor>> {
    if !applies(Kernel::Add, xs) || v.dtype() != xs.dtype() || v.elem_count() != period {
        return Ok(None);
    }
    let op = AddBroadcast {
        inner: u32_of(inner)?,
        period: u32_of(period)?,
    };
    Ok(Some(xs.apply_op2_no_bwd(&v.contiguous()?, &op)?))
}

/// GroupNorm of NCHW `xs` with `groups` groups and the affine `weight`, `bias`, then SiLU if
/// `silu`.
pub(crate) fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !applies(Kernel::GroupNorm, xs) || xs.rank() < 3 || weight.dtype() != xs.dtype() {
        return Ok(None);
    }
    let channels = xs.dim(1)?;
    if channels % groups != 0 || weight.elem_count() != channels || bias.elem_count() != channels {
        return Ok(None);
    }
    let op = GroupNorm {
        groups: u32_of(groups)?,
        hw: u32_of(xs.dims()[2..].iter().product())?,
        eps: eps as f32,
        silu,
    };
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    Ok(Some(xs.apply_op3_no_bwd(&weight, &bias, &op)?))
}

/// GEGLU of `xs` `[.., 2 * inner]`: `xs[.., :inner] * gelu_erf(xs[.., inner:])`.
pub(crate) fn geglu(xs: &Tensor) -> Result<Option<Tensor>> {
    if !applies(Kernel::Geglu, xs) || xs.dims().last().is_none_or(|d| d % 2 != 0) {
        return Ok(None);
    }
    Ok(Some(xs.apply_op1_no_bwd(&Geglu)?))
}

/// im2col of NCHW `xs` for a stride-1 `k` x `k` convolution with `pad`: `[n, c * k * k, ho * wo]`.
pub(crate) fn im2col(xs: &Tensor, k: usize, pad: usize) -> Result<Option<Tensor>> {
    if !applies(Kernel::Im2col, xs) || xs.rank() != 4 {
        return Ok(None);
    }
    let (n, c, h, w) = xs.dims4()?;
    let (ho, wo) = (
        (h + 2 * pad + 1).saturating_sub(k),
        (w + 2 * pad + 1).saturating_sub(k),
    );
    if n * c * k * k * ho * wo >= u32::MAX as usize || ho == 0 || wo == 0 {
        return Ok(None);
    }
    let op = Im2col {
        k: u32_of(k)?,
        pad: u32_of(pad)?,
    };
    Ok(Some(xs.apply_op1_no_bwd(&op)?))
}

/// Softmax over the last dimension, accumulating in f32.
pub(crate) fn softmax_last_dim(xs: &Tensor) -> Result<Option<Tensor>> {
    if !applies(Kernel::Softmax, xs) || xs.rank() == 0 {
        return Ok(None);
    }
    Ok(Some(xs.apply_op1_no_bwd(&Softmax)?))
}

/// Launches kernel `$name` for `$t` (`name_f16`, `name_f32`; the module loads once per device)
/// with the arguments `$arg` in order.
macro_rules! launch {
    ($dev:expr, $t:ty, $name:literal, $config:expr, [$($arg:expr),* $(,)?]) => {{
        let name = format!("{}_{}", $name, <$t as Kind>::SUFFIX);
        let func = $dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )*
        // SAFETY: each caller passes the arguments of the kernel's signature in order, and
        // sizes its output for the elements the kernel writes.
        unsafe { builder.launch($config) }.w()?;
    }};
}

/// The dtypes the kernels are built for.
trait Kind: CudaDType + DeviceRepr + 'static {
    const SUFFIX: &'static str;
}
impl Kind for f16 {
    const SUFFIX: &'static str = "f16";
}
impl Kind for f32 {
    const SUFFIX: &'static str = "f32";
}

/// The contiguous elements of `storage` under `layout`.
fn view<'a, T: Kind>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("the refine crate's CUDA kernels take contiguous inputs"),
    }
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn wrap<T: Kind>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

macro_rules! by_dtype {
    ($storage:expr, $f:ident ( $($arg:expr),* )) => {
        match $storage.dtype() {
            DType::F16 => $f::<f16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            other => bail!("the refine crate's CUDA kernels take f16 or f32, not {other:?}"),
        }
    };
}

fn not_on_cpu<T>(name: &str) -> Result<T> {
    bail!("{name} is a CUDA kernel; the CPU takes candle's path")
}

struct AddBroadcast {
    inner: u32,
    period: u32,
}

impl CustomOp2 for AddBroadcast {
    fn name(&self) -> &'static str {
        "diffusionx-add-broadcast"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        not_on_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn go<T: Kind>(
            op: &AddBroadcast,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<CudaStorage> {
            let dev = s1.device();
            let (x, v) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?);
            let n = l1.shape().elem_count();
            // SAFETY: the kernel writes every element before anything reads it.
            let y = unsafe { dev.alloc::<T>(n)? };
            let n32 = n as u32;
            launch!(
                dev,
                T,
                "add_broadcast",
                elementwise(n),
                [&x, &v, &y, &n32, &op.inner, &op.period]
            );
            Ok(wrap(y, dev))
        }
        let out = by_dtype!(s1, go(self, s1, l1, s2, l2))?;
        Ok((out, l1.shape().clone()))
    }
}

struct GroupNorm {
    groups: u32,
    hw: u32,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "diffusionx-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        not_on_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        #[allow(clippy::too_many_arguments)]
        fn go<T: Kind>(
            op: &GroupNorm,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<CudaStorage> {
            let dev = s1.device();
            let (x, w, b) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?, view::<T>(s3, l3)?);
            let dims = l1.shape().dims();
            let (rows, channels) = (dims[0], dims[1]);
            let per_group = (channels / op.groups as usize) as u32;
            let len = per_group * op.hw;
            let n = l1.shape().elem_count();
            // SAFETY: the kernel writes every element before anything reads it.
            let y = unsafe { dev.alloc::<T>(n)? };
            let silu = i32::from(op.silu);
            // One block per (row, group).
            let config = LaunchConfig {
                grid_dim: (rows as u32 * op.groups, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            let args = (&len, &op.hw, &per_group, &op.groups, &op.eps, &silu);
            launch!(
                dev,
                T,
                "group_norm",
                config,
                [
                    &x, &w, &b, &y, args.0, args.1, args.2, args.3, args.4, args.5
                ]
            );
            Ok(wrap(y, dev))
        }
        let out = by_dtype!(s1, go(self, s1, l1, s2, l2, s3, l3))?;
        Ok((out, l1.shape().clone()))
    }
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "diffusionx-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        not_on_cpu(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn go<T: Kind>(s: &CudaStorage, l: &Layout, inner: usize) -> Result<CudaStorage> {
            let dev = s.device();
            let x = view::<T>(s, l)?;
            let n = l.shape().elem_count() / 2;
            // SAFETY: the kernel writes every element before anything reads it.
            let y = unsafe { dev.alloc::<T>(n)? };
            let (n32, inner32) = (n as u32, inner as u32);
            launch!(dev, T, "geglu", elementwise(n), [&x, &y, &n32, &inner32]);
            Ok(wrap(y, dev))
        }
        let mut dims = l.shape().dims().to_vec();
        let last = dims.len() - 1;
        dims[last] /= 2;
        let out = by_dtype!(s, go(s, l, dims[last]))?;
        Ok((out, Shape::from(dims)))
    }
}

struct Im2col {
    k: u32,
    pad: u32,
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "diffusionx-im2col"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        not_on_cpu(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let (k, pad) = (self.k as usize, self.pad as usize);
        let (ho, wo) = (h + 2 * pad + 1 - k, w + 2 * pad + 1 - k);
        let shape = Shape::from((n, c * k * k, ho * wo));
        let dims = [c, h, w, ho, wo].map(|d| d as u32);
        fn go<T: Kind>(
            op: &Im2col,
            s: &CudaStorage,
            l: &Layout,
            total: usize,
            [c, h, w, ho, wo]: [u32; 5],
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let x = view::<T>(s, l)?;
            // SAFETY: the kernel writes every element before anything reads it.
            let cols = unsafe { dev.alloc::<T>(total)? };
            let total32 = total as u32;
            let config = elementwise(total);
            launch!(
                dev,
                T,
                "im2col",
                config,
                [&x, &cols, &total32, &c, &h, &w, &op.k, &op.pad, &ho, &wo]
            );
            Ok(wrap(cols, dev))
        }
        let out = by_dtype!(s, go(self, s, l, shape.elem_count(), dims))?;
        Ok((out, shape))
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "diffusionx-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        not_on_cpu(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn go<T: Kind>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
            let dev = s.device();
            let x = view::<T>(s, l)?;
            let n = l.shape().elem_count();
            let cols = *l.shape().dims().last().unwrap_or(&1);
            // SAFETY: the kernel writes every element before anything reads it.
            let y = unsafe { dev.alloc::<T>(n)? };
            let cols32 = cols as u32;
            // One block of 256 threads (the kernel's SOFTMAX_THREADS) per row.
            let config = LaunchConfig {
                grid_dim: ((n / cols.max(1)) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(dev, T, "softmax", config, [&x, &y, &cols32]);
            Ok(wrap(y, dev))
        }
        let out = by_dtype!(s, go(s, l))?;
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_list_keeps_what_it_names() {
        assert_eq!(kept(None), Kernel::ALL.to_vec());
        assert_eq!(kept(Some("none")), vec![]);
        assert_eq!(
            kept(Some("softmax, add")),
            vec![Kernel::Add, Kernel::Softmax]
        );
    }
}
