//! Text embeddings of the prompts of the current session, so an unchanged prompt (or the
//! unchanged negative prompt) is not encoded again on the next round.

use std::collections::VecDeque;
use std::sync::Arc;

/// A small first-in first-out cache of prompt -> embedding.
#[derive(Debug, Default)]
pub(crate) struct TextCache {
    capacity: usize,
    entries: VecDeque<(String, Arc<Vec<f32>>)>,
}

impl TextCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: VecDeque::new(),
        }
    }

    pub(crate) fn get(&self, text: &str) -> Option<Arc<Vec<f32>>> {
        self.entries
            .iter()
            .find(|(t, _)| t == text)
            .map(|(_, e)| e.clone())
    }

    pub(crate) fn insert(&mut self, text: &str, embedding: Arc<Vec<f32>>) {
        if self.capacity == 0 || self.get(text).is_some() {
            return;
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((text.to_string(), embedding));
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
