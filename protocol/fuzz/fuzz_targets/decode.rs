//! Any bytes, decoded as a kiosk frame and as a gateway frame: no panic, no unbounded
//! allocation, and whatever decodes re-encodes to exactly the bytes it came from.
#![no_main]

use diffusionx_protocol::{ClientMessage, Codec, Message, ServerMessage};
use libfuzzer_sys::fuzz_target;

fn check<M: Message + PartialEq + std::fmt::Debug>(codec: &Codec, data: &[u8]) {
    if let Ok(Some((message, used))) = codec.decode::<M>(data) {
        let mut again = Vec::new();
        codec.encode(&message, &mut again).expect("a decoded message re-encodes");
        assert_eq!(again, data[..used]);
    }
}

fuzz_target!(|data: &[u8]| {
    let codec = Codec::default();
    check::<ClientMessage>(&codec, data);
    check::<ServerMessage>(&codec, data);
});
