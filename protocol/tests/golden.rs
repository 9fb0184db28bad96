//! The golden frames of `docs/protocol.md` are exactly what this crate writes and reads.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

mod support;

use std::collections::BTreeSet;

use diffusionx_protocol::{ClientMessage, Codec, Message, ServerMessage};

fn assert_golden<M: Message + PartialEq + std::fmt::Debug>(name: &str, message: &M, golden: &[u8]) {
    let codec = Codec::default();
    let mut encoded = Vec::new();
    codec.encode(message, &mut encoded).unwrap();
    assert_eq!(
        encoded, golden,
        "{name}: encoding differs from docs/protocol.md"
    );
    let (decoded, used) = codec.decode::<M>(golden).unwrap().expect("a whole frame");
    assert_eq!(&decoded, message, "{name}: decoding the golden");
    assert_eq!(used, golden.len(), "{name}: bytes used");
}

#[test]
fn every_golden_in_the_spec_matches_the_codec() {
    let doc: Vec<(String, Vec<u8>)> = support::doc_goldens();
    let find = |name: &str| {
        doc.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("docs/protocol.md has no golden {name}"))
            .1
            .clone()
    };
    for (name, message) in support::client_goldens() {
        assert_golden(name, &message, &find(name));
    }
    for (name, message) in support::server_goldens() {
        assert_golden(name, &message, &find(name));
    }
    let tested: BTreeSet<String> = support::client_goldens()
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(support::server_goldens().iter().map(|(n, _)| n.to_string()))
        .collect();
    let documented: BTreeSet<String> = doc.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(documented, tested, "goldens in the spec and in the tests");
}

#[test]
fn the_spec_layout_written_independently_gives_the_same_bytes() {
    let mut encoded = Vec::new();
    Codec::default()
        .encode(&ClientMessage::Refine(support::request()), &mut encoded)
        .unwrap();
    assert_eq!(encoded, support::RawRequest::valid().frame());
    assert_eq!(encoded.len(), 8 + 94 + 4 * 32 * 32 * 2);
}

fn assert_prefixes_need_more<M: Message + std::fmt::Debug>(name: &str, frame: &[u8]) {
    let codec = Codec::default();
    for end in 0..frame.len() {
        match codec.decode::<M>(&frame[..end]) {
            Ok(None) => {}
            other => panic!("{name}: prefix of {end} bytes gave {other:?}, not need-more"),
        }
    }
}

#[test]
fn every_strict_prefix_of_every_golden_needs_more_bytes() {
    let codec = Codec::default();
    for (name, message) in support::client_goldens() {
        let mut frame = Vec::new();
        codec.encode(&message, &mut frame).unwrap();
        assert_prefixes_need_more::<ClientMessage>(name, &frame);
    }
    for (name, message) in support::server_goldens() {
        let mut frame = Vec::new();
        codec.encode(&message, &mut frame).unwrap();
        assert_prefixes_need_more::<ServerMessage>(name, &frame);
    }
}

#[test]
fn two_frames_back_to_back_decode_one_at_a_time() {
    let codec = Codec::default();
    let mut buf = Vec::new();
    codec
        .encode(&ClientMessage::Refine(support::request()), &mut buf)
        .unwrap();
    let first_len = buf.len();
    codec
        .encode(&ClientMessage::Cancel(support::job_id()), &mut buf)
        .unwrap();
    let (first, used) = codec.decode::<ClientMessage>(&buf).unwrap().unwrap();
    assert_eq!(
        (first, used),
        (ClientMessage::Refine(support::request()), first_len)
    );
    let (second, used) = codec
        .decode::<ClientMessage>(&buf[first_len..])
        .unwrap()
        .unwrap();
    assert_eq!(
        (second, used),
        (ClientMessage::Cancel(support::job_id()), 24)
    );
}
