//! transformers' `generate` for captioners, on the host: greedy decoding and
//! beam search over any decoder that yields next-token logits, whatever
//! runs it (candle, ONNX Runtime, libtorch; each keeps its own key/value
//! cache). One implementation, so every backend decodes alike.
//!
//! Reference implementation: `transformers.generation.utils`
//! (`_sample` with `do_sample=False`; `_beam_search`): greedy takes the
//! arg-max (first of equal maxima) and pads rows that already emitted the
//! end token; beam search keeps the top 2k continuations per step, sends
//! those of the top k that end (the end token, or the length limit) to the
//! finished set scored by log-probability / generated length, continues the
//! best k that do not end, and stops once the best running beam cannot beat
//! the worst of k finished ones (the default `early_stopping=False`,
//! `length_penalty=1`).

use crate::Result;

/// A decoder as the loops drive it. Logits are `[rows, vocab]`, row-major.
pub trait Stepper {
    /// Logits at the last position of the prefix (prompt tokens, image
    /// queries, ...), for `rows` identical rows.
    fn prefill(&mut self, rows: usize) -> Result<Vec<f32>>;
    /// Logits after one more token per row.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// Keep rows `rows`, in that order (beam reordering).
    fn reorder(&mut self, rows: &[u32]) -> Result<()>;
}

/// What to stop at.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Stop token (BLIP's `[SEP]`, OPT's `</s>`).
    pub eos: u32,
    /// Filler after a row has ended.
    pub pad: u32,
    /// Most tokens in a sequence, prompt included.
    pub max_len: usize,
}

fn rows_of(logits: &[f32], rows: usize) -> Result<impl Iterator<Item = &[f32]>> {
    if rows == 0 || logits.is_empty() || logits.len() % rows != 0 {
        return Err(crate::Error::model(format!(
            "decoder returned {} logits for {rows} rows",
            logits.len()
        )));
    }
    Ok(logits.chunks(logits.len() / rows))
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `x - max - ln(sum(exp(x - max)))`, in f32.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    let ln = sum.ln();
    row.iter().map(|&x| x - max - ln).collect()
}

/// Greedy decoding of `rows` rows that share the prefix `prompt`.
pub fn greedy(s: &mut dyn Stepper, prompt: &[u32], rows: usize, lim: Limits) -> Result<Vec<Vec<u32>>> {
    let mut seqs = vec![prompt.to_vec(); rows];
    let mut done = vec![false; rows];
    let mut logits = s.prefill(rows)?;
    while seqs[0].len() < lim.max_len {
        let next: Vec<u32> = rows_of(&logits, rows)?.map(argmax).collect();
        let mut last = Vec::with_capacity(rows);
        for (i, &t) in next.iter().enumerate() {
            let t = if done[i] { lim.pad } else { t };
            done[i] |= t == lim.eos;
            seqs[i].push(t);
            last.push(t);
        }
        if done.iter().all(|&d| d) || seqs[0].len() >= lim.max_len {
            break;
        }
        logits = s.step(&last)?;
    }
    Ok(seqs)
}

/// Beam search with `k` beams from the prefix `prompt`; the best finished sequence.
pub fn beam_search(s: &mut dyn Stepper, prompt: &[u32], k: usize, lim: Limits) -> Result<Vec<u32>> {
    const NEG: f32 = -1.0e9;
    // Only the first beam is live at the start, so the k beams differ.
    let mut running: Vec<(Vec<u32>, f32)> = (0..k)
        .map(|b| (prompt.to_vec(), if b == 0 { 0.0 } else { NEG }))
        .collect();
    let mut finished: Vec<(Vec<u32>, f32)> = Vec::new();
    let mut improvable = true;
    let prompt_len = prompt.len();
    let mut logits = s.prefill(k)?;
    loop {
        let cur_len = running[0].0.len();
        let logp: Vec<Vec<f32>> = rows_of(&logits, k)?.map(log_softmax).collect();
        let mut cands: Vec<(f32, usize, u32)> = Vec::with_capacity(k * logp[0].len());
        for (b, row) in logp.iter().enumerate() {
            cands.extend(row.iter().enumerate().map(|(t, &lp)| (lp + running[b].1, b, t as u32)));
        }
        let keep = (2 * k).min(cands.len());
        cands.select_nth_unstable_by(keep - 1, |a, b| b.0.total_cmp(&a.0));
        cands.truncate(keep);
        cands.sort_by(|a, b| b.0.total_cmp(&a.0));
        let at_limit = cur_len + 1 >= lim.max_len;
        let ends: Vec<bool> = cands.iter().map(|c| c.2 == lim.eos || at_limit).collect();

        if improvable {
            let norm = (cur_len + 1 - prompt_len) as f32;
            for (c, _) in cands.iter().zip(&ends).take(k).filter(|(_, &e)| e) {
                let mut seq = running[c.1].0.clone();
                seq.push(c.2);
                finished.push((seq, c.0 / norm));
            }
            finished.sort_by(|a, b| b.1.total_cmp(&a.1));
            finished.truncate(k);
        }

        let penalised = |i: usize| cands[i].0 + if ends[i] { NEG } else { 0.0 };
        let mut order: Vec<usize> = (0..keep).collect();
        order.sort_by(|&a, &b| penalised(b).total_cmp(&penalised(a)));
        let chosen = &order[..k];
        let rows: Vec<u32> = chosen.iter().map(|&i| cands[i].1 as u32).collect();
        running = chosen
            .iter()
            .map(|&i| {
                let mut seq = running[cands[i].1].0.clone();
                seq.push(cands[i].2);
                (seq, penalised(i))
            })
            .collect();

        let best_running = running[0].1 / (cur_len + 1 - prompt_len) as f32;
        let worst_finished = if finished.len() == k { finished[k - 1].1 } else { NEG };
        improvable &= best_running > worst_finished;
        if !improvable || ends.iter().all(|&e| e) {
            break;
        }
        s.reorder(&rows)?;
        let last: Vec<u32> = running.iter().map(|r| *r.0.last().expect("non-empty")).collect();
        logits = s.step(&last)?;
    }
    Ok(finished
        .into_iter()
        .next()
        .map_or_else(|| running.swap_remove(0).0, |f| f.0))
}

/// Decode `n` images' captions from one prefix: greedy over all of them at
/// once when `beams` is 1 (`stepper(None)`: rows = images), else beam
/// search per image (`stepper(Some(i))`: rows = beams of image i).
pub fn generate<'a>(
    mut stepper: impl FnMut(Option<usize>) -> Result<Box<dyn Stepper + 'a>>,
    prompt: &[u32],
    n: usize,
    beams: u32,
    lim: Limits,
) -> Result<Vec<Vec<u32>>> {
    match beams {
        0 => Err(crate::Error::invalid_input("beams must be at least 1")),
        1 => greedy(stepper(None)?.as_mut(), prompt, n, lim).map_err(|e| e.context("greedy decoding")),
        k => (0..n)
            .map(|i| {
                beam_search(stepper(Some(i))?.as_mut(), prompt, k as usize, lim)
                    .map_err(|e| e.context(format!("beam search, image {i}")))
            })
            .collect(),
    }
}

/// A decoder with a key/value cache that the backend keeps (its tensors
/// stay where the backend computes), driven through [`Cached`].
pub trait KvDecoder {
    /// Empty caches for `rows` rows.
    fn start(&mut self, rows: usize) -> Result<()>;
    /// Feed `t` tokens per row (`ids` `[rows, t]`, row-major) on top of
    /// the cache and grow it; the logits at the last position, `[rows, vocab]`.
    fn feed(&mut self, ids: &[i64], rows: usize, t: usize) -> Result<Vec<f32>>;
    /// Keep cache rows `rows`, in that order (beam reordering).
    fn reorder(&mut self, rows: &[u32]) -> Result<()>;
}

/// The [`Stepper`] of a [`KvDecoder`]: the prefix is fed once for all rows,
/// then one token per row per step.
pub struct Cached<D> {
    decoder: D,
    prompt: Vec<u32>,
    rows: usize,
}

impl<D: KvDecoder> Cached<D> {
    /// Decode from `prompt` with `decoder`.
    pub fn new(decoder: D, prompt: &[u32]) -> Self {
        Cached {
            decoder,
            prompt: prompt.to_vec(),
            rows: 0,
        }
    }

    fn last(&mut self, ids: &[i64], t: usize) -> Result<Vec<f32>> {
        let logits = self.decoder.feed(ids, self.rows, t)?;
        // Checked here, so a backend's wrong shape is an error, not a wrong caption.
        rows_of(&logits, self.rows).map(drop)?;
        Ok(logits)
    }
}

impl<D: KvDecoder> Stepper for Cached<D> {
    fn prefill(&mut self, rows: usize) -> Result<Vec<f32>> {
        self.rows = rows;
        self.decoder.start(rows)?;
        let ids: Vec<i64> = self.prompt.iter().map(|&t| t as i64).collect::<Vec<_>>().repeat(rows);
        let t = self.prompt.len();
        self.last(&ids, t)
    }

    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        self.last(&ids, 1)
    }

    fn reorder(&mut self, rows: &[u32]) -> Result<()> {
        self.decoder.reorder(rows)
    }
}

/// The names of a key/value cache's tensors, layer by layer, key then
/// value: (`{input}.{i}.key`, `{output}.{i}.key`), ... — Optimum's
/// `past_key_values` / `present` when called with those.
pub fn kv_names(layers: usize, input: &str, output: &str) -> Vec<(String, String)> {
    (0..layers)
        .flat_map(|i| ["key", "value"].map(|k| (format!("{input}.{i}.{k}"), format!("{output}.{i}.{k}"))))
        .collect()
}

/// The last position's values of row-major `[rows, t, vocab]` logits.
pub fn last_position(logits: &[f32], rows: usize, t: usize) -> Result<Vec<f32>> {
    if rows == 0 || t == 0 || logits.is_empty() || logits.len() % (rows * t) != 0 {
        return Err(crate::Error::model(format!(
            "decoder returned {} logits for {rows} rows of {t} tokens",
            logits.len()
        )));
    }
    let vocab = logits.len() / (rows * t);
    let mut last = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        last.extend_from_slice(&logits[((r + 1) * t - 1) * vocab..(r + 1) * t * vocab]);
    }
    Ok(last)
}

/// Rows `rows` of a row-major `[n, width]` buffer, in that order (a cache
/// tensor's beam reordering on the host).
pub fn gather_rows(data: &[f32], width: usize, rows: &[u32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&data[r as usize * width..(r as usize + 1) * width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bigram "decoder": logits of the next token depend on the last one.
    struct Bigram {
        table: Vec<Vec<f32>>,
        last: Vec<u32>,
    }

    impl Stepper for Bigram {
        fn prefill(&mut self, rows: usize) -> Result<Vec<f32>> {
            self.last = vec![0; rows];
            Ok(self.last.iter().flat_map(|&t| self.table[t as usize].clone()).collect())
        }
        fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
            self.last = tokens.to_vec();
            Ok(self.last.iter().flat_map(|&t| self.table[t as usize].clone()).collect())
        }
        fn reorder(&mut self, rows: &[u32]) -> Result<()> {
            self.last = rows.iter().map(|&r| self.last[r as usize]).collect();
            Ok(())
        }
    }

    fn table() -> Vec<Vec<f32>> {
        // token 3 = eos. From 0: 1 is likelier than 2; 1 leads to a weak
        // continuation, 2 to a sure end: beam search prefers 0 2 3.
        vec![
            vec![-9.0, 1.0, 0.8, -9.0],
            vec![-9.0, 0.0, 0.0, 0.1],
            vec![-9.0, -9.0, -9.0, 5.0],
            vec![0.0, 0.0, 0.0, 0.0],
        ]
    }

    #[test]
    fn greedy_takes_the_argmax_and_pads_after_the_end() {
        let lim = Limits {
            eos: 3,
            pad: 0,
            max_len: 5,
        };
        let mut s = Bigram {
            table: table(),
            last: vec![],
        };
        let out = greedy(&mut s, &[0], 2, lim).unwrap();
        assert_eq!(out, vec![vec![0, 1, 3], vec![0, 1, 3]]);
    }

    #[test]
    fn beam_search_finds_the_likelier_whole_sequence() {
        let lim = Limits {
            eos: 3,
            pad: 0,
            max_len: 5,
        };
        let mut s = Bigram {
            table: table(),
            last: vec![],
        };
        assert_eq!(beam_search(&mut s, &[0], 2, lim).unwrap(), vec![0, 2, 3]);
    }

    /// The bigram table as a cached decoder: the "cache" is each row's
    /// tokens so far, which `Cached` must keep in step through reordering.
    struct BigramKv {
        table: Vec<Vec<f32>>,
        seen: Vec<Vec<i64>>,
    }

    impl KvDecoder for BigramKv {
        fn start(&mut self, rows: usize) -> Result<()> {
            self.seen = vec![Vec::new(); rows];
            Ok(())
        }
        fn feed(&mut self, ids: &[i64], rows: usize, t: usize) -> Result<Vec<f32>> {
            assert_eq!(ids.len(), rows * t);
            let mut out = Vec::new();
            for (r, chunk) in ids.chunks(t).enumerate() {
                self.seen[r].extend(chunk);
                out.extend(self.table[chunk[t - 1] as usize].clone());
            }
            Ok(out)
        }
        fn reorder(&mut self, rows: &[u32]) -> Result<()> {
            self.seen = rows.iter().map(|&r| self.seen[r as usize].clone()).collect();
            Ok(())
        }
    }

    #[test]
    fn a_cached_decoder_decodes_like_the_direct_stepper() {
        let lim = Limits {
            eos: 3,
            pad: 0,
            max_len: 5,
        };
        let kv = || BigramKv {
            table: table(),
            seen: vec![],
        };
        let mut c = Cached::new(kv(), &[0]);
        assert_eq!(
            greedy(&mut c, &[0], 2, lim).unwrap(),
            vec![vec![0, 1, 3], vec![0, 1, 3]]
        );
        let mut c = Cached::new(kv(), &[0]);
        assert_eq!(beam_search(&mut c, &[0], 2, lim).unwrap(), vec![0, 2, 3]);
        // The prefix went in once, then one token per row per step, and
        // the rows followed the beams (0 1 ranked above 0 2 when 0 2 3 ended).
        assert_eq!(c.decoder.seen, vec![vec![0, 1], vec![0, 2]]);
    }

    #[test]
    fn gather_rows_picks_rows_in_order() {
        assert_eq!(
            gather_rows(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, &[2, 0, 0]),
            vec![5.0, 6.0, 1.0, 2.0, 1.0, 2.0]
        );
    }
}
