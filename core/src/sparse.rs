//! Compressed-sparse-row matrices and their product with dense row-major
//! matrices: the kernel under every graph propagation (LightGCN, kNN item
//! graphs). Framework-free, so each backend wraps the same code.

/// A sparse `[rows, cols]` matrix in compressed sparse rows.
pub struct Csr {
    rows: usize,
    cols: usize,
    ptr: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

impl Csr {
    /// From `(row, col, value)` entries (any order; repeats add up).
    pub fn new(rows: usize, cols: usize, entries: &[(u32, u32, f32)]) -> Csr {
        let mut ptr = vec![0usize; rows + 1];
        for &(r, _, _) in entries {
            ptr[r as usize + 1] += 1;
        }
        for r in 0..rows {
            ptr[r + 1] += ptr[r];
        }
        let mut fill = ptr.clone();
        let (mut idx, mut val) = (vec![0u32; entries.len()], vec![0f32; entries.len()]);
        for &(r, c, v) in entries {
            let at = &mut fill[r as usize];
            idx[*at] = c;
            val[*at] = v;
            *at += 1;
        }
        Csr {
            rows,
            cols,
            ptr,
            idx,
            val,
        }
    }

    /// `A x` for a row-major `[cols, d]` slice.
    pub fn matmul(&self, x: &[f32], d: usize) -> Vec<f32> {
        assert_eq!(x.len(), self.cols * d, "sparse matmul: operand is not [cols, d]");
        let mut out = vec![0f32; self.rows * d];
        for (r, o) in out.chunks_mut(d.max(1)).enumerate().take(self.rows) {
            for e in self.ptr[r]..self.ptr[r + 1] {
                let (c, v) = (self.idx[e] as usize, self.val[e]);
                for (o, x) in o.iter_mut().zip(&x[c * d..(c + 1) * d]) {
                    *o += v * x;
                }
            }
        }
        out
    }
}

impl Csr {
    /// Row count.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Column count.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_matches_the_dense_one() {
        let a = Csr::new(2, 3, &[(1, 0, 2.0), (0, 2, -1.0), (1, 0, 0.5), (1, 2, 1.0)]);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        // dense A = [[0, 0, -1], [2.5, 0, 1]]
        assert_eq!(a.matmul(&x, 2), vec![-5.0, -6.0, 7.5, 11.0]);
    }
}
