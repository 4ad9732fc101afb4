//! Virtual-time building blocks of the two-agent simulations: packets in flight and a script
//! of changes to the world, each taken in time order (ties in insertion order).

#![allow(dead_code, unreachable_pub)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Instant;

/// Packets in flight, delivered in arrival-time order.
pub struct InFlight<T> {
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    items: BTreeMap<u64, T>,
    seq: u64,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        Self {
            queue: BinaryHeap::new(),
            items: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<T> InFlight<T> {
    /// `item` arrives at `at`.
    pub fn push(&mut self, at: Instant, item: T) {
        self.seq += 1;
        self.items.insert(self.seq, item);
        self.queue.push(Reverse((at, self.seq)));
    }

    /// When the next item arrives.
    pub fn next_at(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((t, _))| *t)
    }

    /// The next item that has arrived by `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        let Reverse((t, id)) = *self.queue.peek()?;
        if t > now {
            return None;
        }
        self.queue.pop();
        self.items.remove(&id)
    }
}

/// A step of a script: a change to the world `W`.
pub type Step<W> = Box<dyn FnOnce(&mut W)>;

/// Scripted changes to a world `W`, applied in time order.
pub struct Script<W> {
    steps: Vec<(Instant, Step<W>)>,
}

impl<W> Default for Script<W> {
    fn default() -> Self {
        Self { steps: Vec::new() }
    }
}

impl<W> Script<W> {
    /// Runs `f` at `t`.
    pub fn at(&mut self, t: Instant, f: impl FnOnce(&mut W) + 'static) {
        self.steps.push((t, Box::new(f)));
        self.steps.sort_by_key(|(t, _)| *t);
    }

    /// When the next step is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.steps.first().map(|(t, _)| *t)
    }

    /// The next step due by `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Step<W>> {
        if self.next_at()? > now {
            return None;
        }
        Some(self.steps.remove(0).1)
    }
}

/// The earliest of `deadlines`, if it comes before `end`: the next instant to simulate.
pub fn next_instant(
    end: Instant,
    deadlines: impl IntoIterator<Item = Option<Instant>>,
) -> Option<Instant> {
    deadlines.into_iter().flatten().min().filter(|&t| t < end)
}
