//! Quantized tensors that live in the file map: candle's `QTensor` over blocks borrowed from a
//! GGUF mmap, so a Q8_0 (or K-quant) weight costs no copy and its pages are the file's pages.
//!
//! candle's CPU `QStorage` holds a `Box<dyn QuantizedType>`; [`MappedBlocks`] implements that trait
//! over a range of the map (keeping the map alive through an `Arc`), delegating the arithmetic to
//! candle's own kernels (`k_quants::matmul`, `GgmlType::to_float`).

use std::marker::PhantomData;
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{QStorage, QTensor, QuantizedType};
use candle_core::CpuStorage;
use half::f16;
use memmap2::Mmap;

use super::format::GgmlType as FileType;

/// `n_blocks` blocks of type `T` at byte `offset` of `map`.
pub struct MappedBlocks<T> {
    map: Arc<Mmap>,
    offset: usize,
    n_blocks: usize,
    _t: PhantomData<T>,
}

impl<T: GgmlType> MappedBlocks<T> {
    pub fn new(map: Arc<Mmap>, offset: usize, n_blocks: usize) -> Result<Self> {
        let size = std::mem::size_of::<T>();
        if offset + n_blocks * size > map.len() {
            bail!("tensor data past the end of the file");
        }
        if (map.as_ptr() as usize + offset) % std::mem::align_of::<T>() != 0 {
            bail!("tensor data at offset {offset} is not aligned for its block type");
        }
        Ok(Self {
            map,
            offset,
            n_blocks,
            _t: PhantomData,
        })
    }

    fn blocks(&self) -> &[T] {
        // SAFETY: bounds and alignment were checked in `new`; block types are plain data.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(self.offset) as *const T,
                self.n_blocks,
            )
        }
    }
}

impl<T: GgmlType + Send + Sync> QuantizedType for MappedBlocks<T> {
    fn dtype(&self) -> candle_core::quantized::GgmlDType {
        T::DTYPE
    }

    fn matmul_t(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> candle_core::Result<()> {
        k_quants::matmul(mkn, lhs, self.blocks(), dst)
    }

    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f16],
        dst: &mut [f16],
    ) -> candle_core::Result<()> {
        k_quants::matmul_f16(mkn, lhs, self.blocks(), dst)
    }

    fn embedding(
        &self,
        ids: &[u32],
        rows: usize,
        hidden: usize,
    ) -> candle_core::Result<CpuStorage> {
        if hidden % T::BLCK_SIZE != 0 {
            candle_core::bail!(
                "quantized embedding width {hidden} is not a multiple of {}",
                T::BLCK_SIZE
            )
        }
        let row_blocks = hidden / T::BLCK_SIZE;
        if self.n_blocks != rows * row_blocks {
            candle_core::bail!(
                "quantized embedding has {} blocks, expected {}",
                self.n_blocks,
                rows * row_blocks
            )
        }
        let blocks = self.blocks();
        let mut out = vec![0f32; ids.len() * hidden];
        for (i, &id) in ids.iter().enumerate() {
            let row = id as usize;
            if row >= rows {
                candle_core::bail!("token id {row} is outside the embedding of {rows} rows")
            }
            T::to_float(
                &blocks[row * row_blocks..(row + 1) * row_blocks],
                &mut out[i * hidden..(i + 1) * hidden],
            );
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> candle_core::Result<CpuStorage> {
        let mut ys = vec![0f32; elem_count];
        T::to_float(self.blocks(), &mut ys);
        Ok(CpuStorage::F32(ys))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.n_blocks * std::mem::size_of::<T>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.blocks().as_ptr() as *const u8
    }

    fn block_size(&self) -> usize {
        T::BLCK_SIZE
    }

    fn from_float(&mut self, _xs: &[f32]) {
        panic!("a memory-mapped GGUF tensor is read-only")
    }

    fn from_float_imatrix(&mut self, _xs: &[f32], _w: &[f32], _n: usize) {
        panic!("a memory-mapped GGUF tensor is read-only")
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

fn boxed<T: GgmlType + Send + Sync + 'static>(
    map: Arc<Mmap>,
    offset: usize,
    n_blocks: usize,
) -> Result<Box<dyn QuantizedType>> {
    Ok(Box::new(MappedBlocks::<T>::new(map, offset, n_blocks)?))
}

/// A `QTensor` of PyTorch shape `shape` (`[rows, row_len]` for a matrix) over `map[offset..]`.
pub fn mapped_qtensor(
    map: Arc<Mmap>,
    offset: usize,
    dtype: FileType,
    shape: &[usize],
) -> Result<QTensor> {
    let elements: usize = shape.iter().product();
    let n_blocks = elements / dtype.block_size();
    use k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
        BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1,
    };
    let storage = match dtype {
        FileType::Q4_0 => boxed::<BlockQ4_0>(map, offset, n_blocks)?,
        FileType::Q4_1 => boxed::<BlockQ4_1>(map, offset, n_blocks)?,
        FileType::Q5_0 => boxed::<BlockQ5_0>(map, offset, n_blocks)?,
        FileType::Q5_1 => boxed::<BlockQ5_1>(map, offset, n_blocks)?,
        FileType::Q8_0 => boxed::<BlockQ8_0>(map, offset, n_blocks)?,
        FileType::Q8_1 => boxed::<BlockQ8_1>(map, offset, n_blocks)?,
        FileType::Q2K => boxed::<BlockQ2K>(map, offset, n_blocks)?,
        FileType::Q3K => boxed::<BlockQ3K>(map, offset, n_blocks)?,
        FileType::Q4K => boxed::<BlockQ4K>(map, offset, n_blocks)?,
        FileType::Q5K => boxed::<BlockQ5K>(map, offset, n_blocks)?,
        FileType::Q6K => boxed::<BlockQ6K>(map, offset, n_blocks)?,
        FileType::Q8K => boxed::<BlockQ8K>(map, offset, n_blocks)?,
        other => bail!(
            "{} tensors are loaded as dense f32, not mapped",
            other.name()
        ),
    };
    Ok(QTensor::new(QStorage::Cpu(storage), shape)?)
}
