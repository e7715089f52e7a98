//! Client library for Weft's resource manager (`ClientService`); `rmctl` is
//! built on it. The generated client lives in `weft_proto::v1::client_service_client`.

pub use weft_proto::v1 as proto;
