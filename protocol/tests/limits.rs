//! Every over-limit or malformed field gives its own specific error, found from the bytes
//! already present and before anything is allocated for it.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

mod support;

use diffusionx_protocol::{
    ClientMessage, Codec, DecodeError, Direction, Field, JobError, LatentShape, Limits,
    MessageType, ServerMessage, ValidationError,
};
use support::{RawRequest, frame};

fn decode_request(raw: &RawRequest) -> Result<Option<(ClientMessage, usize)>, DecodeError> {
    Codec::default().decode::<ClientMessage>(&raw.frame())
}

fn invalid(raw: &RawRequest) -> ValidationError {
    match decode_request(raw) {
        Err(DecodeError::Invalid(e)) => e,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

fn with(edit: impl FnOnce(&mut RawRequest)) -> RawRequest {
    let mut raw = RawRequest::valid();
    edit(&mut raw);
    raw
}

#[test]
fn the_raw_builder_makes_a_valid_request() {
    let (message, _) = decode_request(&RawRequest::valid()).unwrap().unwrap();
    assert_eq!(message, ClientMessage::Refine(support::request()));
}

#[test]
fn header_errors_are_found_as_soon_as_their_bytes_arrive() {
    let codec = Codec::default();
    let client = |bytes: &[u8]| codec.decode::<ClientMessage>(bytes);
    assert_eq!(client(b"DY"), Err(DecodeError::BadMagic(*b"DY")));
    assert_eq!(client(b"DX\x02"), Err(DecodeError::UnsupportedVersion(2)));
    assert_eq!(
        client(b"DX\x01\x7f"),
        Err(DecodeError::UnknownMessageType(0x7f))
    );
    assert_eq!(
        client(b"DX\x01\x83"),
        Err(DecodeError::WrongDirection {
            kind: MessageType::RefineResult,
            expected: Direction::KioskToGateway
        })
    );
    assert_eq!(
        codec.decode::<ServerMessage>(b"DX\x01\x01"),
        Err(DecodeError::WrongDirection {
            kind: MessageType::RefineRequest,
            expected: Direction::GatewayToKiosk
        })
    );
}

#[test]
fn an_oversized_frame_is_refused_from_its_header_alone() {
    let codec = Codec::default();
    let max = Limits::default().max_client_payload;
    let header = [b"DX\x01\x01".as_slice(), &(max + 1).to_le_bytes()].concat();
    assert_eq!(
        codec.decode::<ClientMessage>(&header),
        Err(DecodeError::FrameTooLarge { len: max + 1, max })
    );
    let server_max = Limits::default().max_server_payload;
    let header = [b"DX\x01\x83".as_slice(), &u32::MAX.to_le_bytes()].concat();
    assert_eq!(
        codec.decode::<ServerMessage>(&header),
        Err(DecodeError::FrameTooLarge {
            len: u32::MAX,
            max: server_max
        })
    );
    // At the limit it is only "need more bytes".
    let header = [b"DX\x01\x01".as_slice(), &max.to_le_bytes()].concat();
    assert_eq!(codec.decode::<ClientMessage>(&header), Ok(None));
}

#[test]
fn text_fields_over_their_byte_limit() {
    let long = vec![b'a'; 1025];
    assert_eq!(
        invalid(&with(|r| r.prompt = long.clone())),
        ValidationError::TextTooLong {
            field: Field::Prompt,
            len: 1025,
            max: 1024
        }
    );
    assert_eq!(
        invalid(&with(|r| r.negative = long.clone())),
        ValidationError::TextTooLong {
            field: Field::NegativePrompt,
            len: 1025,
            max: 1024
        }
    );
    // At the limit it is accepted.
    assert!(
        decode_request(&with(|r| r.prompt = vec![b'a'; 1024]))
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_text_length_over_the_limit_is_refused_before_its_bytes_arrive() {
    let mut payload = RawRequest::valid().payload();
    payload.truncate(16 + 16 + 9);
    payload.extend_from_slice(&u16::MAX.to_le_bytes());
    let codec = Codec::default();
    assert_eq!(
        codec.decode::<ClientMessage>(&frame(0x01, &payload)),
        Err(ValidationError::TextTooLong {
            field: Field::Prompt,
            len: 65535,
            max: 1024
        }
        .into())
    );
}

#[test]
fn text_fields_must_be_utf8() {
    assert_eq!(
        invalid(&with(|r| r.prompt = vec![0xff, 0xfe])),
        ValidationError::InvalidUtf8 {
            field: Field::Prompt
        }
    );
    assert_eq!(
        invalid(&with(|r| r.negative = vec![0xc3])),
        ValidationError::InvalidUtf8 {
            field: Field::NegativePrompt
        }
    );
}

#[test]
fn unicode_prompts_round_trip() {
    let codec = Codec::default();
    let mut request = support::request();
    request.prompt = "Café au lait, Ölgemälde, 東京の夜 🌃".into();
    let message = ClientMessage::Refine(request);
    let mut buf = Vec::new();
    codec.encode(&message, &mut buf).unwrap();
    assert_eq!(
        codec.decode::<ClientMessage>(&buf).unwrap().unwrap().0,
        message
    );
}

#[test]
fn device_ids() {
    let bad = |device: &[u8]| invalid(&with(|r| r.device = device.to_vec()));
    assert_eq!(bad(b""), ValidationError::InvalidDeviceId(String::new()));
    assert_eq!(
        bad(b"kiosk/1"),
        ValidationError::InvalidDeviceId("kiosk/1".into())
    );
    assert_eq!(
        bad(b"kiosk+1"),
        ValidationError::InvalidDeviceId("kiosk+1".into())
    );
    assert_eq!(
        bad(&[b'k'; 65]),
        ValidationError::InvalidDeviceId("k".repeat(65))
    );
    assert!(
        decode_request(&with(|r| r.device = vec![b'k'; 64]))
            .unwrap()
            .is_some()
    );
}

#[test]
fn prompt_token_counts() {
    let limits = Limits::default();
    assert_eq!(limits.check_prompt_tokens(Field::Prompt, 77), Ok(()));
    assert_eq!(
        limits.check_prompt_tokens(Field::NegativePrompt, 78),
        Err(ValidationError::TooManyTokens {
            field: Field::NegativePrompt,
            count: 78,
            max: 77
        })
    );
}

#[test]
fn resolutions() {
    let res = |w: u16, h: u16| {
        invalid(&with(|r| {
            r.width = w;
            r.height = h;
        }))
    };
    let err = |width, height| ValidationError::Resolution {
        width,
        height,
        min: 256,
        max: 1024,
    };
    assert_eq!(res(248, 256), err(248, 256));
    assert_eq!(res(256, 1032), err(256, 1032));
    assert_eq!(res(260, 256), err(260, 256));
}

#[test]
fn latent_shape_and_dtype() {
    assert_eq!(
        invalid(&with(|r| r.dtype = 3)),
        ValidationError::UnknownDtype(3)
    );
    assert_eq!(
        invalid(&with(|r| r.channels = 3)),
        ValidationError::LatentChannels(3)
    );
    assert_eq!(
        invalid(&with(|r| {
            r.latent_height = 40;
            r.data = [0x00, 0x38].repeat(4 * 40 * 32);
        })),
        ValidationError::LatentShape {
            latent_height: 40,
            latent_width: 32,
            expected_height: 32,
            expected_width: 32
        }
    );
}

#[test]
fn a_huge_latent_shape_is_refused_before_its_values_are_read() {
    // 4 x 65535 x 65535 f32 would be 68 GB; the frame holds none of it.
    let raw = with(|r| {
        r.dtype = 2;
        r.latent_height = u16::MAX;
        r.latent_width = u16::MAX;
        r.data.clear();
    });
    assert_eq!(
        invalid(&raw),
        ValidationError::Resolution {
            width: u16::MAX,
            height: u16::MAX,
            min: 256,
            max: 1024
        }
    );
}

#[test]
fn a_latent_with_too_few_values_is_truncated() {
    let raw = with(|r| r.data.truncate(100));
    assert_eq!(
        decode_request(&raw),
        Err(DecodeError::Truncated(Field::Latent))
    );
}

#[test]
fn non_finite_latents_are_refused() {
    let mut f32_data: Vec<u8> = (0..4 * 32 * 32)
        .flat_map(|_| 0.25f32.to_le_bytes())
        .collect();
    f32_data[4 * 7..4 * 8].copy_from_slice(&f32::NAN.to_le_bytes());
    let err = invalid(&with(|r| {
        r.dtype = 2;
        r.data = f32_data.clone();
    }));
    assert!(matches!(err, ValidationError::NonFiniteLatent { index: 7, value } if value.is_nan()));

    let mut f16_data = [0x00, 0x38].repeat(4 * 32 * 32);
    f16_data[2 * 9..2 * 10].copy_from_slice(&[0x00, 0x7c]); // f16 +infinity
    assert_eq!(
        invalid(&with(|r| r.data = f16_data.clone())),
        ValidationError::NonFiniteLatent {
            index: 9,
            value: f32::INFINITY
        }
    );
    // The typed constructor refuses the same values.
    let shape = LatentShape {
        channels: 4,
        height: 32,
        width: 32,
    };
    let mut values = vec![0.0f32; shape.len()];
    values[3] = f32::NEG_INFINITY;
    assert_eq!(
        diffusionx_protocol::Latent::new(shape, diffusionx_protocol::LatentData::F32(values)),
        Err(ValidationError::NonFiniteLatent {
            index: 3,
            value: f32::NEG_INFINITY
        })
    );
}

#[test]
fn noise_levels_and_steps() {
    assert_eq!(
        invalid(&with(|r| r.noise_bp = 0)),
        ValidationError::NoiseLevel(0)
    );
    assert_eq!(
        invalid(&with(|r| r.noise_bp = 10_001)),
        ValidationError::NoiseLevel(10_001)
    );
    assert_eq!(
        invalid(&with(|r| r.steps = 0)),
        ValidationError::Steps { value: 0, max: 200 }
    );
    assert_eq!(
        invalid(&with(|r| r.steps = 201)),
        ValidationError::Steps {
            value: 201,
            max: 200
        }
    );
    assert_eq!(
        invalid(&with(|r| {
            r.steps = 1;
            r.noise_bp = 9999;
        })),
        ValidationError::NoDenoisingSteps {
            steps: 1,
            noise_level_bp: 9999
        }
    );
}

#[test]
fn guidance_scales() {
    for bad in [f32::NAN, -0.5, 30.5, f32::INFINITY] {
        let err = invalid(&with(|r| r.guidance = bad));
        assert!(
            matches!(err, ValidationError::GuidanceScale { value, max: 30.0 }
                if value.to_bits() == bad.to_bits()),
            "{bad}: {err:?}"
        );
    }
}

#[test]
fn enum_codes_flags_and_deadlines() {
    assert_eq!(
        invalid(&with(|r| r.scheduler = 9)),
        ValidationError::UnknownScheduler(9)
    );
    assert_eq!(
        invalid(&with(|r| r.format = 3)),
        ValidationError::UnknownImageFormat(3)
    );
    let quality = |format, quality| {
        invalid(&with(|r| {
            r.format = format;
            r.quality = quality;
        }))
    };
    assert_eq!(
        quality(2, 0),
        ValidationError::JpegQuality {
            format: "jpeg",
            quality: 0
        }
    );
    assert_eq!(
        quality(2, 101),
        ValidationError::JpegQuality {
            format: "jpeg",
            quality: 101
        }
    );
    assert_eq!(
        quality(1, 90),
        ValidationError::JpegQuality {
            format: "png",
            quality: 90
        }
    );
    assert_eq!(
        invalid(&with(|r| r.flags = 0x03)),
        ValidationError::ReservedFlags(0x03)
    );
    assert_eq!(
        invalid(&with(|r| r.deadline_ms = 0)),
        ValidationError::Deadline {
            value: 0,
            max: 600_000
        }
    );
    assert_eq!(
        invalid(&with(|r| r.deadline_ms = 600_001)),
        ValidationError::Deadline {
            value: 600_001,
            max: 600_000
        }
    );
}

#[test]
fn trailing_and_missing_bytes() {
    let mut payload = RawRequest::valid().payload();
    payload.push(0);
    let codec = Codec::default();
    assert_eq!(
        codec.decode::<ClientMessage>(&frame(0x01, &payload)),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        codec.decode::<ClientMessage>(&frame(0x02, &[0])),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        codec.decode::<ClientMessage>(&frame(0x03, &[0; 15])),
        Err(DecodeError::Truncated(Field::JobId))
    );
    let payload = RawRequest::valid().payload();
    assert_eq!(
        codec.decode::<ClientMessage>(&frame(0x01, &payload[..60 + 3])),
        Err(DecodeError::Truncated(Field::Seed))
    );
}

#[test]
fn server_frames_out_of_bounds() {
    let codec = Codec::default();
    let job = [7u8; 16];
    let server = |kind: u8, rest: &[u8]| {
        codec.decode::<ServerMessage>(&frame(kind, &[job.as_slice(), rest].concat()))
    };
    let invalid = |e: ValidationError| Err(DecodeError::Invalid(e));
    assert_eq!(
        server(0x82, &[0, 0, 5, 0]),
        invalid(ValidationError::Progress { step: 0, total: 5 })
    );
    assert_eq!(
        server(0x82, &[6, 0, 5, 0]),
        invalid(ValidationError::Progress { step: 6, total: 5 })
    );
    assert_eq!(
        server(0x85, &[99]),
        invalid(ValidationError::UnknownErrorCode(99))
    );
    assert_eq!(
        server(0x85, &[2, 99, 0, 0]),
        invalid(ValidationError::UnknownField(99))
    );
    let long_message = [&[3u8, 0x01, 0x04][..], &[b'x'; 1025]].concat();
    assert_eq!(
        server(0x85, &long_message),
        invalid(ValidationError::TextTooLong {
            field: Field::Error,
            len: 1025,
            max: 1024
        })
    );
    // A result announcing a 4 GB image is refused before the image is read.
    let mut result = vec![10, 0];
    result.extend_from_slice(&[0; 24]);
    result.extend_from_slice(&[1, 0, 1, 0, 1]);
    result.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        server(0x83, &result),
        invalid(ValidationError::ImageSize {
            len: u32::MAX as usize,
            max: 20 << 20
        })
    );
    // has_latent must be a boolean byte.
    let mut result = vec![10, 0];
    result.extend_from_slice(&[0; 24]);
    result.extend_from_slice(&[1, 0, 1, 0, 1, 1, 0, 0, 0, 0xaa, 2]);
    assert_eq!(
        server(0x83, &result),
        invalid(ValidationError::Bool {
            field: Field::Latent,
            value: 2
        })
    );
}

#[test]
fn encoding_refuses_what_decoding_would_refuse() {
    let codec = Codec::default();
    let mut request = support::request();
    request.prompt = "x".repeat(2000);
    let mut out = vec![0xee];
    assert_eq!(
        codec.encode(&ClientMessage::Refine(request), &mut out),
        Err(ValidationError::TextTooLong {
            field: Field::Prompt,
            len: 2000,
            max: 1024
        })
    );
    assert_eq!(out, [0xee], "nothing was written");

    let tight = Codec::new(Limits {
        max_client_payload: 100,
        ..Limits::default()
    });
    assert_eq!(
        tight.encode(&ClientMessage::Refine(support::request()), &mut out),
        Err(ValidationError::PayloadTooLarge {
            len: 8286,
            max: 100
        })
    );
    assert_eq!(out, [0xee], "nothing was written");
}

#[test]
fn decode_errors_become_the_answer_the_gateway_sends() {
    let codec = Codec::default();
    let err = codec.decode::<ClientMessage>(b"DX\x05").unwrap_err();
    assert_eq!(
        JobError::from_decode(&err),
        JobError::UnsupportedVersion { supported: 1 }
    );
    let err = decode_request(&with(|r| r.steps = 0)).unwrap_err();
    assert_eq!(
        JobError::from_decode(&err),
        JobError::InvalidRequest {
            field: Field::Steps,
            message: "step count 0 is outside 1..=200".into()
        }
    );
    let err = codec.decode::<ClientMessage>(b"XX").unwrap_err();
    assert_eq!(JobError::from_decode(&err).code(), 2);
    assert_eq!(err.field(), Field::Frame);
}
