//! Round trips of every message shape, and a deterministic mutation run showing the decoder
//! answers every corrupted frame without panicking (the fuzz target explores further).
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

mod support;

use diffusionx_protocol::{
    ClientMessage, Codec, Latent, LatentData, LatentShape, Message, OutputFormat, Resolution,
    ServerMessage, ValidationError,
};

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(message: &M) -> usize {
    let codec = Codec::default();
    let mut buf = Vec::new();
    codec.encode(message, &mut buf).unwrap();
    let (decoded, used) = codec.decode::<M>(&buf).unwrap().unwrap();
    assert_eq!(&decoded, message);
    assert_eq!(used, buf.len());
    used
}

#[test]
fn every_message_shape_round_trips() {
    for (_, message) in support::client_goldens() {
        round_trip(&message);
    }
    for (_, message) in support::server_goldens() {
        round_trip(&message);
    }
    // An f32 latent, non-square, largest size, JPEG, latent requested.
    let shape = LatentShape {
        channels: 4,
        height: 128,
        width: 96,
    };
    let values: Vec<f32> = (0..shape.len())
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    let mut request = support::request();
    request.resolution = Resolution {
        width: 768,
        height: 1024,
    };
    request.latent = Latent::new(shape, LatentData::F32(values)).unwrap();
    request.output = OutputFormat::Jpeg { quality: 92 };
    request.return_latent = true;
    request.seed = u64::MAX;
    let used = round_trip(&ClientMessage::Refine(request.clone()));
    assert_eq!(used, 8 + 94 + shape.len() * 4);

    let mut result = support::result();
    result.image.resolution = request.resolution;
    result.latent = Some(request.latent.clone());
    round_trip(&ServerMessage::Result(result.clone()));

    // protocol.md: a result's latent is its image's, each side divided by 8.
    result.image.resolution = Resolution {
        width: 256,
        height: 256,
    };
    let mut frame = Vec::new();
    assert_eq!(
        Codec::default().encode(&ServerMessage::Result(result), &mut frame),
        Err(ValidationError::LatentShape {
            latent_height: 128,
            latent_width: 96,
            expected_height: 32,
            expected_width: 32
        })
    );
}

/// xorshift64*: a fixed sequence, so a failure is reproducible from the iteration number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(3) {
        match rng.below(5) {
            0 if !frame.is_empty() => {
                let i = rng.below(frame.len());
                frame[i] ^= 1 << rng.below(8);
            }
            1 if !frame.is_empty() => {
                let i = rng.below(frame.len());
                frame[i] = rng.next() as u8;
            }
            2 => frame.truncate(rng.below(frame.len() + 1)),
            3 => {
                let i = rng.below(frame.len() + 1);
                frame.insert(i, rng.next() as u8);
            }
            _ if frame.len() >= 8 => {
                // Rewrite the length field, sometimes consistently with the bytes present.
                let len = match rng.below(2) {
                    0 => (frame.len() - 8) as u32,
                    _ => rng.next() as u32,
                };
                frame[4..8].copy_from_slice(&len.to_le_bytes());
            }
            _ => {}
        }
    }
    frame
}

/// Decodes `bytes`; whatever decodes must re-encode to a frame that decodes to the same value.
fn check<M: Message + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> bool {
    let codec = Codec::default();
    match codec.decode::<M>(bytes) {
        Ok(Some((message, used))) => {
            assert!(used <= bytes.len());
            let mut again = Vec::new();
            codec
                .encode(&message, &mut again)
                .expect("a decoded message re-encodes");
            assert_eq!(again, bytes[..used], "canonical encoding");
            true
        }
        Ok(None) | Err(_) => false,
    }
}

#[test]
fn mutated_frames_never_panic_and_what_decodes_is_canonical() {
    let codec = Codec::default();
    let mut seeds = Vec::new();
    for (_, message) in support::client_goldens() {
        let mut buf = Vec::new();
        codec.encode(&message, &mut buf).unwrap();
        seeds.push(buf);
    }
    for (_, message) in support::server_goldens() {
        let mut buf = Vec::new();
        codec.encode(&message, &mut buf).unwrap();
        seeds.push(buf);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut decoded, mut refused) = (0usize, 0usize);
    for _ in 0..20_000 {
        let seed = seeds[rng.below(seeds.len())].clone();
        let bytes = mutate(&mut rng, seed);
        let ok = check::<ClientMessage>(&bytes) | check::<ServerMessage>(&bytes);
        if ok { decoded += 1 } else { refused += 1 }
    }
    // Both outcomes occur: the mutations reach past the header checks.
    assert!(
        decoded > 1000 && refused > 1000,
        "decoded {decoded}, refused {refused}"
    );
}
