//! Sample messages and an independent byte-level frame builder shared by the protocol tests.
#![allow(dead_code, clippy::unwrap_used)]

use diffusionx_protocol::{
    ClientMessage, DeviceId, Dtype, EncodedImage, Field, ImageFormat, JobError, JobId, Latent,
    LatentData, LatentShape, LoadReport, NoiseLevel, OutputFormat, PhaseTimings, Queued,
    RefineRequest, RefineResult, Resolution, Scheduler, ServerMessage, SessionId, StepProgress,
};
use half::f16;

pub(crate) fn job_id() -> JobId {
    JobId::from_bytes(std::array::from_fn(|i| i as u8))
}

pub(crate) fn session_id() -> SessionId {
    SessionId::from_bytes(std::array::from_fn(|i| 0x10 + i as u8))
}

/// A 4x32x32 latent with every value 0.5 (f16 0x3800).
pub(crate) fn half_latent() -> Latent {
    let shape = LatentShape {
        channels: 4,
        height: 32,
        width: 32,
    };
    Latent::new(
        shape,
        LatentData::F16(vec![f16::from_f32(0.5); shape.len()]),
    )
    .unwrap()
}

pub(crate) fn request() -> RefineRequest {
    RefineRequest {
        job_id: job_id(),
        session_id: session_id(),
        device_id: DeviceId::new("kiosk-01").unwrap(),
        prompt: "a red fox".into(),
        negative_prompt: "blurry".into(),
        seed: 42,
        resolution: Resolution {
            width: 256,
            height: 256,
        },
        noise_level: NoiseLevel::from_bp(5000).unwrap(),
        steps: 20,
        guidance_scale: 7.5,
        scheduler: Scheduler::Euler,
        output: OutputFormat::Png,
        return_latent: false,
        deadline_ms: 30_000,
        latent: half_latent(),
    }
}

pub(crate) fn result() -> RefineResult {
    RefineResult {
        job_id: job_id(),
        steps_run: 10,
        timings: PhaseTimings {
            queue_us: 1,
            text_us: 2,
            denoise_us: 3,
            decode_us: 4,
            encode_us: 5,
            total_us: 15,
        },
        image: EncodedImage {
            format: ImageFormat::Png,
            resolution: Resolution {
                width: 256,
                height: 256,
            },
            bytes: b"\x89PNG\r\n\x1a\n".to_vec(),
        },
        latent: None,
    }
}

pub(crate) fn error(error: JobError) -> ServerMessage {
    ServerMessage::Error {
        job_id: job_id(),
        error,
    }
}

/// Every golden of `docs/protocol.md`, by name, with the message it encodes.
pub(crate) fn client_goldens() -> Vec<(&'static str, ClientMessage)> {
    vec![
        ("refine-request", ClientMessage::Refine(request())),
        ("load-probe", ClientMessage::LoadProbe),
        ("cancel", ClientMessage::Cancel(job_id())),
    ]
}

pub(crate) fn server_goldens() -> Vec<(&'static str, ServerMessage)> {
    let msg = |s: &str| s.to_string();
    vec![
        (
            "queued",
            ServerMessage::Queued(Queued {
                job_id: job_id(),
                position: 3,
                expected_wait_ms: 4500,
            }),
        ),
        (
            "step-progress",
            ServerMessage::Progress(StepProgress {
                job_id: job_id(),
                step: 4,
                total: 10,
            }),
        ),
        ("refine-result", ServerMessage::Result(result())),
        (
            "load-report",
            ServerMessage::Load(LoadReport {
                queue_depth: 2,
                running: 4,
                max_batch: 8,
                expected_wait_ms: 1200,
                step_ms: 350,
                accepting: true,
            }),
        ),
        (
            "error-busy",
            error(JobError::Busy {
                retry_after_ms: 2000,
            }),
        ),
        (
            "error-invalid-request",
            error(JobError::InvalidRequest {
                field: Field::Steps,
                message: msg("steps 0"),
            }),
        ),
        (
            "error-unauthorized",
            error(JobError::Unauthorized {
                message: msg("no cert"),
            }),
        ),
        (
            "error-internal",
            error(JobError::Internal {
                message: msg("oom"),
            }),
        ),
        ("error-cancelled", error(JobError::Cancelled)),
        ("error-deadline-exceeded", error(JobError::DeadlineExceeded)),
        (
            "error-shutting-down",
            error(JobError::ShuttingDown {
                retry_after_ms: 500,
            }),
        ),
        (
            "error-unsupported-version",
            error(JobError::UnsupportedVersion { supported: 1 }),
        ),
    ]
}

/// The refine request's layout written out field by field, independently of the crate, so a
/// test can put any value (valid or not) in any field.
#[derive(Clone)]
pub(crate) struct RawRequest {
    pub(crate) job: [u8; 16],
    pub(crate) session: [u8; 16],
    pub(crate) device: Vec<u8>,
    pub(crate) prompt: Vec<u8>,
    pub(crate) negative: Vec<u8>,
    pub(crate) seed: u64,
    pub(crate) width: u16,
    pub(crate) height: u16,
    pub(crate) noise_bp: u16,
    pub(crate) steps: u16,
    pub(crate) guidance: f32,
    pub(crate) scheduler: u8,
    pub(crate) format: u8,
    pub(crate) quality: u8,
    pub(crate) flags: u8,
    pub(crate) deadline_ms: u32,
    pub(crate) dtype: u8,
    pub(crate) channels: u8,
    pub(crate) latent_height: u16,
    pub(crate) latent_width: u16,
    pub(crate) data: Vec<u8>,
}

impl RawRequest {
    /// The same request as [`request()`].
    pub(crate) fn valid() -> Self {
        Self {
            job: *job_id().as_bytes(),
            session: *session_id().as_bytes(),
            device: b"kiosk-01".to_vec(),
            prompt: b"a red fox".to_vec(),
            negative: b"blurry".to_vec(),
            seed: 42,
            width: 256,
            height: 256,
            noise_bp: 5000,
            steps: 20,
            guidance: 7.5,
            scheduler: Scheduler::Euler as u8,
            format: 1,
            quality: 0,
            flags: 0,
            deadline_ms: 30_000,
            dtype: Dtype::F16 as u8,
            channels: 4,
            latent_height: 32,
            latent_width: 32,
            data: [0x00, 0x38].repeat(4 * 32 * 32),
        }
    }

    pub(crate) fn payload(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&self.job);
        p.extend_from_slice(&self.session);
        p.push(self.device.len() as u8);
        p.extend_from_slice(&self.device);
        p.extend_from_slice(&(self.prompt.len() as u16).to_le_bytes());
        p.extend_from_slice(&self.prompt);
        p.extend_from_slice(&(self.negative.len() as u16).to_le_bytes());
        p.extend_from_slice(&self.negative);
        p.extend_from_slice(&self.seed.to_le_bytes());
        p.extend_from_slice(&self.width.to_le_bytes());
        p.extend_from_slice(&self.height.to_le_bytes());
        p.extend_from_slice(&self.noise_bp.to_le_bytes());
        p.extend_from_slice(&self.steps.to_le_bytes());
        p.extend_from_slice(&self.guidance.to_le_bytes());
        p.extend_from_slice(&[self.scheduler, self.format, self.quality, self.flags]);
        p.extend_from_slice(&self.deadline_ms.to_le_bytes());
        p.extend_from_slice(&[self.dtype, self.channels]);
        p.extend_from_slice(&self.latent_height.to_le_bytes());
        p.extend_from_slice(&self.latent_width.to_le_bytes());
        p.extend_from_slice(&self.data);
        p
    }

    pub(crate) fn frame(&self) -> Vec<u8> {
        frame(0x01, &self.payload())
    }
}

/// A frame with a correct header around `payload`.
pub(crate) fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![b'D', b'X', 1, kind];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Parses the golden blocks of `docs/protocol.md`: fenced blocks opened by ```` ```golden NAME ````
/// holding hex bytes, `#` comments, and `{HEX... * COUNT}` runs.
pub(crate) fn doc_goldens() -> Vec<(String, Vec<u8>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md is readable");
    let mut goldens = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("```golden ") else {
            continue;
        };
        let mut text = String::new();
        for body in lines.by_ref() {
            if body.starts_with("```") {
                break;
            }
            text.push_str(body.split('#').next().unwrap());
            text.push(' ');
        }
        goldens.push((name.trim().to_string(), parse_hex(&text)));
    }
    goldens
}

fn parse_hex(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.extend(hex_bytes(&rest[..open]));
        let close = rest[open..].find('}').expect("a run closes") + open;
        let (bytes, count) = rest[open + 1..close]
            .split_once('*')
            .expect("a run has a count");
        out.extend(hex_bytes(bytes).repeat(count.trim().parse().expect("a run count")));
        rest = &rest[close + 1..];
    }
    out.extend(hex_bytes(rest));
    out
}

fn hex_bytes(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad hex byte {b:?}")))
        .collect()
}
