//! Early stopping on validation Recall@10 for the trainable rankers: keep a
//! copy of the best weights, stop after `patience` epochs without a better
//! recall, restore the best, report recall@10 / ndcg@10 / epochs.

use candle_core::{Result, Tensor, Var};
use ragar_core::abi_stable::std_types::{RString, RVec, Tuple2};
use ragar_core::stage::FitReport;

/// The state across epochs.
pub struct EarlyStopping {
    patience: usize,
    recall: f64,
    ndcg: f64,
    since: usize,
    epochs: usize,
    best: Option<Vec<Tensor>>,
}

impl EarlyStopping {
    /// Stop after `patience` epochs without improvement.
    pub fn new(patience: usize) -> Self {
        EarlyStopping {
            patience,
            recall: -1.0,
            ndcg: 0.0,
            since: 0,
            epochs: 0,
            best: None,
        }
    }

    /// Record one epoch's validation figures; true when training should stop.
    pub fn epoch(&mut self, recall: f64, ndcg: f64, vars: &[(String, Var)]) -> Result<bool> {
        self.epochs += 1;
        if recall > self.recall {
            (self.recall, self.ndcg, self.since) = (recall, ndcg, 0);
            self.best = Some(vars.iter().map(|(_, v)| v.as_tensor().copy()).collect::<Result<_>>()?);
            return Ok(false);
        }
        self.since += 1;
        Ok(self.since >= self.patience)
    }

    /// Put the best weights back.
    pub fn restore(&self, vars: &[(String, Var)]) -> Result<()> {
        if let Some(best) = &self.best {
            for ((_, v), t) in vars.iter().zip(best) {
                v.set(t)?;
            }
        }
        Ok(())
    }

    /// `recall@10`, `ndcg@10` (of the best epoch) and `epochs` run.
    pub fn report(&self) -> FitReport {
        let m = |k: &str, v: f64| Tuple2(RString::from(k), v);
        FitReport {
            metrics: RVec::from(vec![
                m("recall@10", self.recall.max(0.0)),
                m("ndcg@10", self.ndcg),
                m("epochs", self.epochs as f64),
            ]),
        }
    }
}
