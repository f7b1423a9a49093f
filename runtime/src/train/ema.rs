//! The exponential moving average of the parameters (`precision.ema { decay }`), kept in host
//! memory in f32 and updated off the training thread: after each optimizer step the trainer
//! hands the new parameters (shared, not copied) to a worker thread, which folds them in as
//! `ema = decay · ema + (1 − decay) · param`. Updates are applied in order; [`Ema::snapshot`]
//! waits for those already handed over, so a checkpoint holds the EMA of exactly its step.

use crate::cpu::{Real, Value};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

enum Message<T: Real> {
    Update(Vec<Value<T>>),
    Snapshot(SyncSender<Vec<Vec<f32>>>),
}

pub struct Ema<T: Real> {
    sender: Option<SyncSender<Message<T>>>,
    worker: Option<JoinHandle<()>>,
}

impl<T: Real> Ema<T> {
    /// Starts the worker from `initial` (the parameters, or a checkpoint's EMA).
    pub fn start(decay: f64, initial: Vec<Vec<f32>>) -> Self {
        // Two steps of slack: training blocks only if the worker falls further behind.
        let (sender, receiver) = mpsc::sync_channel(2);
        let worker = std::thread::Builder::new()
            .name("dsc-ema".into())
            .spawn(move || run(decay, initial, receiver))
            .expect("spawning the EMA thread");
        Ema { sender: Some(sender), worker: Some(worker) }
    }

    /// Folds in the parameters after a step.
    pub fn update(&self, params: Vec<Value<T>>) {
        self.send(Message::Update(params));
    }

    /// The EMA once every update handed over so far is applied.
    pub fn snapshot(&self) -> Vec<Vec<f32>> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Message::Snapshot(reply));
        answer.recv().expect("the EMA thread answers")
    }

    fn send(&self, message: Message<T>) {
        self.sender.as_ref().expect("open until drop").send(message).expect("the EMA thread runs");
    }
}

impl<T: Real> Drop for Ema<T> {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(worker) = self.worker.take() {
            // A panic there has already been reported on stderr; nothing to add here.
            let _ = worker.join();
        }
    }
}

fn run<T: Real>(decay: f64, mut ema: Vec<Vec<f32>>, messages: Receiver<Message<T>>) {
    for message in messages {
        match message {
            Message::Update(params) => {
                for (e, p) in ema.iter_mut().zip(&params) {
                    for (x, &y) in e.iter_mut().zip(&p.as_real().data) {
                        *x = (decay * f64::from(*x) + (1.0 - decay) * y.to_f64()) as f32;
                    }
                }
            }
            Message::Snapshot(reply) => {
                // The requester waits on the reply; if it is gone there is nobody to tell.
                let _ = reply.send(ema.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Tensor;

    #[test]
    fn updates_apply_in_order_before_a_snapshot() {
        let ema = Ema::<f32>::start(0.5, vec![vec![0.0, 8.0]]);
        for x in [4.0f32, 8.0] {
            ema.update(vec![Value::real(Tensor::new(vec![2], vec![x, x]))]);
        }
        // 0 → 2 → 5 and 8 → 6 → 7.
        assert_eq!(ema.snapshot(), vec![vec![5.0, 7.0]]);
    }
}
