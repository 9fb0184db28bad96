//! `kiosk`: the kiosk firmware's main binary (configuration and hardware backends come with the
//! rest of issue #5; the demo drives the library directly).

fn main() {}
