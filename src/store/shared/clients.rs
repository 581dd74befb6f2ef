//! The object store's clients (S3, GCS, Azure through `object_store`), built from
//! `storage.shared`: credentials from files, or the provider's usual environment.

use std::sync::Arc;

use object_store::multipart::MultipartStore;
use object_store::signer::Signer;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::config::{SharedConfig, SharedKind};

/// The store's three faces: objects, multipart uploads, presigning.
type Clients = (
    Arc<dyn ObjectStore>,
    Arc<dyn MultipartStore>,
    Arc<dyn Signer>,
);

/// The store's clients, from the configuration; the same client behind each face.
pub(super) fn clients(
    config: &SharedConfig,
    options: ClientOptions,
    retry: RetryConfig,
) -> std::result::Result<Clients, String> {
    let at = |e: object_store::Error| format!("storage.shared: {e}");
    match config.kind {
        SharedKind::S3 => {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(&config.bucket)
                .with_client_options(options)
                .with_retry(retry)
                .with_virtual_hosted_style_request(!config.path_style);
            if let Some(r) = &config.region {
                b = b.with_region(r);
            }
            if let Some(e) = &config.endpoint {
                b = b.with_endpoint(e);
            }
            if let (Some(id), Some(secret)) =
                (&config.access_key_id_file, &config.secret_access_key_file)
            {
                b = b
                    .with_access_key_id(read_secret(id, "access_key_id_file")?)
                    .with_secret_access_key(read_secret(secret, "secret_access_key_file")?);
            }
            let s = Arc::new(b.build().map_err(at)?);
            Ok((s.clone(), s.clone(), s))
        }
        SharedKind::Gcs => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&config.bucket)
                .with_client_options(options)
                .with_retry(retry);
            if let Some(f) = &config.service_account_file {
                b = b.with_service_account_path(f.display().to_string());
            }
            let s = Arc::new(b.build().map_err(at)?);
            Ok((s.clone(), s.clone(), s))
        }
        SharedKind::Azure => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(&config.bucket)
                .with_client_options(options)
                .with_retry(retry);
            if let Some(a) = &config.account {
                b = b.with_account(a);
            }
            if let Some(f) = &config.access_key_file {
                b = b.with_access_key(read_secret(f, "access_key_file")?);
            }
            if let Some(e) = &config.endpoint {
                b = b.with_endpoint(e.clone());
            }
            let s = Arc::new(b.build().map_err(at)?);
            Ok((s.clone(), s.clone(), s))
        }
    }
}

fn read_secret(path: &std::path::Path, key: &str) -> std::result::Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("storage.shared.{key} {}: {e}", path.display()))
}
