//! The OCI distribution vocabulary: digests, names, references, media types, error codes
//! and the request-path grammar. Pure parsing, no I/O; everything that enters berth from
//! a client or an upstream is turned into these types before it is used.

mod digest;
mod error;
pub mod manifest;
pub mod media;
mod name;
pub mod pattern;
mod route;
mod text;

pub use digest::{Algorithm, Digest, Hasher, InvalidDigest};
pub use error::{Error, ErrorCode};
pub use media::AcceptSet;
pub use name::{ImageRef, InvalidName, Reference, Repository, Tag};
pub use pattern::Pattern;
pub use route::{Endpoint, Route};
pub use text::{digits, saturating_digits, Quoted};
