//! The waiting room: per-device round robin, so one busy kiosk cannot starve the others.

use std::collections::{HashMap, VecDeque};

/// Items waiting, grouped by device and served round robin across devices, in arrival order
/// within a device.
#[derive(Debug)]
pub(crate) struct FairQueue<T> {
    /// Devices with waiting items; the front one is served next.
    order: VecDeque<String>,
    per_device: HashMap<String, VecDeque<T>>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            order: VecDeque::new(),
            per_device: HashMap::new(),
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    /// Items waiting.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Items of `device` waiting.
    pub(crate) fn device_len(&self, device: &str) -> usize {
        self.per_device.get(device).map_or(0, VecDeque::len)
    }

    /// Adds `item` behind `device`'s earlier items.
    pub(crate) fn push(&mut self, device: &str, item: T) {
        let queue = self.per_device.entry(device.to_owned()).or_default();
        if queue.is_empty() {
            self.order.push_back(device.to_owned());
        }
        queue.push_back(item);
        self.len += 1;
    }

    /// Every waiting item in the order they would be served: round `r` takes the `r`-th item of
    /// each device, devices in their current turn order.
    pub(crate) fn in_order(&self) -> Vec<&T> {
        let mut out = Vec::with_capacity(self.len);
        let mut round = 0;
        while out.len() < self.len {
            for device in &self.order {
                if let Some(item) = self.per_device.get(device).and_then(|q| q.get(round)) {
                    out.push(item);
                }
            }
            round += 1;
        }
        out
    }

    /// Calls `f` with each waiting item and its position in serving order (0 = next).
    pub(crate) fn positions_mut(&mut self, mut f: impl FnMut(usize, &mut T)) {
        let mut position = 0;
        let mut round = 0;
        while position < self.len {
            for device in &self.order {
                if let Some(item) = self
                    .per_device
                    .get_mut(device)
                    .and_then(|q| q.get_mut(round))
                {
                    f(position, item);
                    position += 1;
                }
            }
            round += 1;
        }
    }

    /// Removes and returns the next item in serving order if it `fits`; its device goes to the
    /// back of the turn order. An item that does not fit stays first: nothing behind it is
    /// served past it.
    pub(crate) fn take_next_if(&mut self, fits: impl FnOnce(&T) -> bool) -> Option<T> {
        let device = self.order.front()?;
        let queue = self.per_device.get_mut(device)?;
        if !fits(queue.front()?) {
            return None;
        }
        let item = queue.pop_front()?;
        self.len -= 1;
        let device = self.order.pop_front()?;
        if queue.is_empty() {
            self.per_device.remove(&device);
        } else {
            self.order.push_back(device);
        }
        Some(item)
    }

    /// Removes and returns every item for which `drop` is true.
    pub(crate) fn remove_where(&mut self, mut drop: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut removed = Vec::new();
        for queue in self.per_device.values_mut() {
            let mut kept = VecDeque::with_capacity(queue.len());
            for item in queue.drain(..) {
                if drop(&item) {
                    removed.push(item);
                } else {
                    kept.push_back(item);
                }
            }
            *queue = kept;
        }
        self.per_device.retain(|_, q| !q.is_empty());
        let per_device = &self.per_device;
        self.order.retain(|d| per_device.contains_key(d));
        self.len -= removed.len();
        removed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn queue(items: &[(&str, u32)]) -> FairQueue<u32> {
        let mut q = FairQueue::default();
        for (device, item) in items {
            q.push(device, *item);
        }
        q
    }

    #[test]
    fn devices_take_turns_whatever_the_arrival_order() {
        // Kiosk a sends four jobs before b and c send one each.
        let mut q = queue(&[("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 10), ("c", 20)]);
        assert_eq!(q.in_order(), vec![&1, &10, &20, &2, &3, &4]);
        let served: Vec<u32> = std::iter::from_fn(|| q.take_next_if(|_| true)).collect();
        assert_eq!(served, vec![1, 10, 20, 2, 3, 4]);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn positions_follow_the_serving_order() {
        let mut q = queue(&[("a", 1), ("a", 2), ("b", 10)]);
        let mut seen = Vec::new();
        q.positions_mut(|p, x| seen.push((p, *x)));
        assert_eq!(seen, vec![(0, 1), (1, 10), (2, 2)]);
    }

    #[test]
    fn a_served_device_goes_to_the_back() {
        let mut q = queue(&[("a", 1), ("a", 2), ("b", 10)]);
        assert_eq!(q.take_next_if(|_| true), Some(1));
        q.push("c", 20);
        // b then c waited while a was served.
        assert_eq!(q.in_order(), vec![&10, &2, &20]);
    }

    #[test]
    fn take_next_if_serves_nothing_past_an_item_that_does_not_fit() {
        let mut q = queue(&[("a", 1), ("b", 10), ("a", 2)]);
        assert_eq!(q.take_next_if(|x| *x % 2 == 0), None);
        assert_eq!(q.in_order(), vec![&1, &10, &2], "nothing moved");
        assert_eq!(q.take_next_if(|x| *x % 2 == 1), Some(1));
        assert_eq!(q.take_next_if(|x| *x % 2 == 0), Some(10));
        assert_eq!(q.take_next_if(|x| *x % 2 == 0), Some(2));
        assert_eq!(q.take_next_if(|_| true), None);
        assert_eq!(q.len(), 0);
        assert_eq!((q.device_len("a"), q.device_len("b")), (0, 0));
    }

    #[test]
    fn remove_where_keeps_the_rest_in_order() {
        let mut q = queue(&[("a", 1), ("b", 10), ("a", 2), ("b", 11), ("c", 20)]);
        let mut removed = q.remove_where(|x| *x == 10 || *x == 11 || *x == 1);
        removed.sort_unstable();
        assert_eq!(removed, vec![1, 10, 11]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.in_order(), vec![&2, &20]);
    }
}
