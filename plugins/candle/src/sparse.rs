//! A fixed sparse matrix times a dense one, with autograd through the dense
//! operand: what graph recommenders spend their time on (LightGCN's
//! user-item propagation, MICRO's item-item kNN graphs). The reference
//! implementations call `torch.sparse.mm`; candle has no sparse tensors, and
//! the dense stand-in (gather every edge's row, scale, scatter-add) moves
//! `edges x d` floats three times each way. On CPU this is a CSR kernel (a
//! candle custom op whose backward is the transposed matrix's product); on
//! other devices the gather/scatter form. The kernel itself is
//! framework-free and lives in `ragar_core::sparse`.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use ragar_core::sparse::Csr;
use std::sync::Arc;

/// A fixed sparse `[rows, cols]` matrix.
#[derive(Clone)]
pub struct Sparse {
    a: Arc<Csr>,
    at: Arc<Csr>,
    /// The gather/scatter form for devices without the CSR kernel.
    coo: Arc<(Vec<u32>, Vec<u32>, Vec<f32>)>,
}

impl Sparse {
    /// From `(row, col, value)` entries.
    pub fn new(rows: usize, cols: usize, entries: &[(u32, u32, f32)]) -> Sparse {
        let flipped: Vec<(u32, u32, f32)> = entries.iter().map(|&(r, c, v)| (c, r, v)).collect();
        Sparse {
            a: Arc::new(Csr::new(rows, cols, entries)),
            at: Arc::new(Csr::new(cols, rows, &flipped)),
            coo: Arc::new((
                entries.iter().map(|e| e.0).collect(),
                entries.iter().map(|e| e.1).collect(),
                entries.iter().map(|e| e.2).collect(),
            )),
        }
    }

    /// The transposed matrix.
    pub fn t(&self) -> Sparse {
        let (r, c, v) = &*self.coo;
        Sparse {
            a: self.at.clone(),
            at: self.a.clone(),
            coo: Arc::new((c.clone(), r.clone(), v.clone())),
        }
    }

    /// `A x` for `x: [cols, d]` f32; differentiable in `x`.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _) = x.dims2()?;
        if n != self.a.cols() {
            candle_core::bail!(
                "sparse matmul: matrix has {} columns, dense operand {n} rows",
                self.a.cols()
            )
        }
        if x.device().is_cpu() {
            return x.contiguous()?.apply_op1(SpMm {
                a: self.a.clone(),
                at: self.at.clone(),
            });
        }
        let (r, c, v) = &*self.coo;
        let dev = x.device();
        let rows = Tensor::new(r.as_slice(), dev)?;
        let cols = Tensor::new(c.as_slice(), dev)?;
        let vals = Tensor::new(v.as_slice(), dev)?.unsqueeze(1)?;
        let msgs = x.index_select(&cols, 0)?.broadcast_mul(&vals)?;
        Tensor::zeros((self.a.rows(), x.dim(1)?), x.dtype(), dev)?.index_add(&rows, &msgs, 0)
    }
}

struct SpMm {
    a: Arc<Csr>,
    at: Arc<Csr>,
}

impl CustomOp1 for SpMm {
    fn name(&self) -> &'static str {
        "sparse-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("sparse matmul: f32 only")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sparse matmul: contiguous input only")
        };
        let d = layout.dims()[1];
        let out = self.a.matmul(&data[start..end], d);
        Ok((CpuStorage::F32(out), Shape::from((self.a.rows(), d))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d(Ax)/dx applied to g is A^T g.
        grad.contiguous()?
            .apply_op1(SpMm {
                a: self.at.clone(),
                at: self.a.clone(),
            })
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn product_and_gradient_equal_the_dense_ones() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let entries = [(0, 1, 0.5), (0, 3, -1.0), (2, 0, 2.0), (2, 0, 0.25), (1, 2, 1.5)];
        let s = Sparse::new(3, 4, &entries);
        let mut dense = vec![0f32; 12];
        for &(r, c, v) in &entries {
            dense[r as usize * 4 + c as usize] += v;
        }
        let dense = Tensor::from_vec(dense, (3, 4), &dev)?;
        let x = Var::from_tensor(&Tensor::arange(0f32, 8., &dev)?.reshape((4, 2))?)?;
        let w = Tensor::new(&[[1f32, -2.], [0.5, 3.], [2., 1.]], &dev)?;
        let (ys, yd) = (s.matmul(x.as_tensor())?, dense.matmul(x.as_tensor())?);
        assert_eq!(ys.to_vec2::<f32>()?, yd.to_vec2::<f32>()?);
        let gs = (ys * &w)?.sum_all()?.backward()?;
        let gd = (yd * &w)?.sum_all()?.backward()?;
        assert_eq!(
            gs.get(&x).unwrap().to_vec2::<f32>()?,
            gd.get(&x).unwrap().to_vec2::<f32>()?
        );
        assert_eq!(
            s.t().matmul(&w)?.to_vec2::<f32>()?,
            dense.t()?.matmul(&w)?.to_vec2::<f32>()?
        );
        Ok(())
    }
}
