//! Where files live: local paths and `file://`, `s3://`, `gs://`, `az://` URLs, each turned into
//! an `object_store` store (one per bucket, credentials from the standard environment variables)
//! plus the object's path in it.

use crate::engine::requests::CountingConnector;
use crate::engine::snapshot::FileTag;
use crate::error::{Error, Result};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use url::Url;

/// An object (or prefix) in a store.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    /// `scheme://bucket` (or `file://`): what DataFusion registers the store under.
    pub base: Url,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.url())
    }
}

impl Location {
    /// The location as a URL string (`file:///abs/path` for local files).
    pub fn url(&self) -> String {
        format!("{}/{}", self.base.as_str().trim_end_matches('/'), self.path)
    }

    /// What users wrote: plain paths for local files, URLs otherwise.
    pub fn display(&self) -> String {
        if self.base.scheme() == "file" {
            format!("/{}", self.path)
        } else {
            self.url()
        }
    }

    pub fn child(&self, part: &str) -> Location {
        let mut path = self.path.clone();
        for segment in part.split('/').filter(|s| !s.is_empty()) {
            path = path.join(segment);
        }
        Location { path, ..self.clone() }
    }

    pub fn with_path(&self, path: Path) -> Location {
        Location { path, ..self.clone() }
    }

    pub async fn read(&self) -> Result<Option<bytes::Bytes>> {
        match self.store.get(&self.path).await {
            Ok(body) => Ok(Some(body.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The object's bytes with the tag (ETag and size) of the very object this response read.
    pub async fn read_tagged(&self) -> Result<Option<(bytes::Bytes, Option<FileTag>)>> {
        match self.store.get(&self.path).await {
            Ok(body) => {
                let tag = FileTag::of(&body.meta);
                Ok(Some((body.bytes().await?, tag)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// One atomic PUT (a rename on local disk): readers see the old object or the new one.
    /// Returns the tag the store gave the new object (`None` when it gives no ETag).
    pub async fn write(&self, bytes: Vec<u8>) -> Result<Option<FileTag>> {
        let size = bytes.len() as u64;
        let put = self.store.put(&self.path, bytes.into()).await?;
        Ok(put.e_tag.map(|e_tag| FileTag { e_tag, size }))
    }
}

/// Builds and caches one store per (scheme, bucket).
#[derive(Default)]
pub struct Stores {
    cache: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl Stores {
    pub fn resolve(&self, location: &str) -> Result<Location> {
        if !location.contains("://") || location.starts_with("file://") {
            let raw = location.strip_prefix("file://").unwrap_or(location);
            let path = Path::from_absolute_path(raw)
                .map_err(|e| Error::Config(format!("{location}: not a usable local path: {e}")))?;
            let store = self.cached("file://", || Ok(Arc::new(LocalFileSystem::new())))?;
            return Ok(Location {
                store,
                path,
                base: Url::parse("file:///").expect("static URL"),
            });
        }
        let url = Url::parse(location).map_err(|e| Error::Config(format!("{location}: not a valid URL: {e}")))?;
        let bucket = url
            .host_str()
            .ok_or_else(|| Error::Config(format!("{location}: the URL names no bucket or container")))?
            .to_string();
        let scheme = url.scheme().to_string();
        let base = Url::parse(&format!("{scheme}://{bucket}")).map_err(|e| Error::Internal(e.to_string()))?;
        let store = self.cached(base.as_str(), || {
            let store: Arc<dyn ObjectStore> = match scheme.as_str() {
                "s3" | "s3a" => Arc::new(
                    AmazonS3Builder::from_env()
                        .with_bucket_name(&bucket)
                        .with_http_connector(CountingConnector)
                        .build()?,
                ),
                "gs" => Arc::new(
                    GoogleCloudStorageBuilder::from_env()
                        .with_bucket_name(&bucket)
                        .with_http_connector(CountingConnector)
                        .build()?,
                ),
                "az" | "abfs" | "abfss" | "azure" => Arc::new(
                    MicrosoftAzureBuilder::from_env()
                        .with_url(location)
                        .with_http_connector(CountingConnector)
                        .build()?,
                ),
                other => {
                    return Err(Error::Config(format!(
                        "{location}: unsupported scheme '{other}://'; use a local path, file://, s3://, gs:// or az://"
                    )));
                }
            };
            Ok(Arc::new(super::retry::RetryingStore::new(store)))
        })?;
        let path = Path::from_url_path(url.path()).map_err(|e| Error::Config(format!("{location}: {e}")))?;
        Ok(Location { store, path, base })
    }

    fn cached(&self, key: &str, build: impl FnOnce() -> Result<Arc<dyn ObjectStore>>) -> Result<Arc<dyn ObjectStore>> {
        let mut cache = self.cache.lock().expect("store cache lock");
        if let Some(store) = cache.get(key) {
            return Ok(store.clone());
        }
        let store = build()?;
        cache.insert(key.to_string(), store.clone());
        Ok(store)
    }

    /// Every store built so far with the URL it serves, for registering with DataFusion.
    pub fn registered(&self) -> Vec<(Url, Arc<dyn ObjectStore>)> {
        let cache = self.cache.lock().expect("store cache lock");
        cache
            .iter()
            .filter(|(k, _)| k.as_str() != "file://")
            .filter_map(|(k, s)| Url::parse(k).ok().map(|u| (u, s.clone())))
            .collect()
    }
}
