//! Plain data that crosses a stage boundary: images, tensors.
//!
//! Framework tensors (candle, tch, ort) never leave their plugin; they are
//! converted to these types at the boundary. Both are `#[repr(C)]` and
//! `StableAbi`, so a dynamically loaded plugin can produce them.

use crate::error::{Error, Result};
use abi_stable::std_types::RVec;
use abi_stable::StableAbi;

/// An 8-bit RGB image, row-major, `width * height * 3` bytes.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved RGB bytes.
    pub rgb: RVec<u8>,
}

impl Image {
    /// An image from interleaved RGB bytes; checks the length.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self> {
        let want = width as usize * height as usize * 3;
        if rgb.len() != want {
            return Err(Error::invalid_input(format!(
                "image of {width}x{height} needs {want} RGB bytes, got {}",
                rgb.len()
            )));
        }
        Ok(Image {
            width,
            height,
            rgb: rgb.into(),
        })
    }
    /// The pixel at (x, y) as [r, g, b].
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
}

/// Element type of a [`Tensor`].
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// The config spelling: `f32`, `f16`, `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
    /// Parse the config spelling.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::config(format!(
                "unknown dtype '{s}' (expected f32, f16 or bf16)"
            ))),
        }
    }

    /// The name the export scripts give `file` (`model.ts`) when written in
    /// this precision (`--dtype f16`): `model.ts` for f32, `model.f16.ts`,
    /// `model.bf16.ts` (scripts/ragar_export.py `ts_name`). Both can sit in
    /// one model folder; the config's `dtype` picks.
    pub fn exported_file(self, file: &str) -> String {
        match (self, file.rsplit_once('.')) {
            (DType::F32, _) | (_, None) => file.to_string(),
            (d, Some((stem, ext))) => format!("{stem}.{}.{ext}", d.as_str()),
        }
    }

    /// The precision an exported file was written in, from its name
    /// (`unet/model.f16.ts` -> f16; no suffix -> f32).
    pub fn of_exported_file(file: &str) -> DType {
        let stem = file.rsplit_once('.').map_or(file, |(stem, _)| stem);
        match stem.rsplit_once('.').map(|(_, d)| d) {
            Some("f16") => DType::F16,
            Some("bf16") => DType::BF16,
            _ => DType::F32,
        }
    }

    /// What an export command needs to write files of this precision:
    /// nothing for f32, ` --dtype f16` for f16.
    pub fn export_flag(self) -> String {
        match self {
            DType::F32 => String::new(),
            d => format!(" --dtype {}", d.as_str()),
        }
    }
}

/// Tensor storage; f16 and bf16 are kept as their raw 16-bit patterns.
#[repr(u8)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats.
    F32(RVec<f32>),
    /// IEEE half bit patterns.
    F16(RVec<u16>),
    /// bfloat16 bit patterns.
    BF16(RVec<u16>),
}

/// A dense row-major tensor: shape plus a typed buffer.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: RVec<u64>,
    /// Elements, row-major.
    pub data: TensorData,
}

impl Tensor {
    /// An f32 tensor; checks that `data` fills `shape`.
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::invalid_input(format!(
                "tensor of shape {shape:?} needs {numel} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor {
            shape: shape.iter().map(|&d| d as u64).collect(),
            data: TensorData::F32(data.into()),
        })
    }
    /// Stack equal-length rows into a `[rows, dim]` f32 tensor.
    pub fn from_rows(rows: &[Vec<f32>]) -> Result<Self> {
        let dim = rows.first().map_or(0, Vec::len);
        if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != dim) {
            return Err(Error::invalid_input(format!(
                "row {i} has {} values, row 0 has {dim}",
                r.len()
            )));
        }
        Self::from_f32(&[rows.len(), dim], rows.concat())
    }
    /// Dimensions as `usize`.
    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<u64>() as usize
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }
    /// All elements converted to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.to_vec(),
            TensorData::F16(v) => v.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect(),
            TensorData::BF16(v) => v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
        }
    }
    /// The rows of a 2-D tensor as f32 vectors.
    pub fn to_rows(&self) -> Result<Vec<Vec<f32>>> {
        let dims = self.dims();
        if dims.len() != 2 {
            return Err(Error::invalid_input(format!(
                "expected a 2-D tensor, got shape {dims:?}"
            )));
        }
        let flat = self.to_f32_vec();
        Ok(flat.chunks(dims[1].max(1)).take(dims[0]).map(<[f32]>::to_vec).collect())
    }
    /// Convert to another element type (rounding to nearest).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        let f = self.to_f32_vec();
        let data = match dtype {
            DType::F32 => TensorData::F32(f.into()),
            DType::F16 => TensorData::F16(f.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect()),
            DType::BF16 => TensorData::BF16(f.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()),
        };
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_checked() {
        assert!(Tensor::from_f32(&[2, 3], vec![0.0; 5]).is_err());
        assert!(Image::new(2, 2, vec![0; 11]).is_err());
    }

    #[test]
    fn rows_round_trip_and_dtypes() {
        let t = Tensor::from_rows(&[vec![1.0, -2.5], vec![0.5, 3.0]]).unwrap();
        assert_eq!(t.dims(), vec![2, 2]);
        assert_eq!(t.to_rows().unwrap()[1], vec![0.5, 3.0]);
        // These values are exact in both half formats.
        assert_eq!(t.to_dtype(DType::F16).to_f32_vec(), t.to_f32_vec());
        assert_eq!(t.to_dtype(DType::BF16).to_f32_vec(), t.to_f32_vec());
        assert!(Tensor::from_rows(&[vec![1.0], vec![1.0, 2.0]]).is_err());
    }

    #[test]
    fn exported_file_names_round_trip_through_their_dtype() {
        assert_eq!(DType::F32.exported_file("unet/model.ts"), "unet/model.ts");
        assert_eq!(DType::F16.exported_file("unet/model.ts"), "unet/model.f16.ts");
        assert_eq!(DType::BF16.exported_file("vision_model.ts"), "vision_model.bf16.ts");
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(DType::of_exported_file(&d.exported_file("text_model.ts")), d);
        }
        // A dot in a folder or a stem that is no dtype is not a suffix.
        assert_eq!(DType::of_exported_file("sd-1.5/unet/model.ts"), DType::F32);
        assert_eq!(DType::of_exported_file("model.onnx"), DType::F32);
        assert_eq!(DType::F16.export_flag(), " --dtype f16");
        assert_eq!(DType::F32.export_flag(), "");
    }
}
