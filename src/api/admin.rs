//! AdminService: operations (role `admin`).

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::auth::caller;
use crate::api::pb::{self, admin_service_server::AdminService};
use crate::vault::Vault;

/// Bytes per BackupChunk.
const CHUNK: usize = 64 * 1024;

pub struct AdminApi {
    vault: Arc<Vault>,
}

impl AdminApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        AdminApi { vault }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    type BackupStream = ReceiverStream<Result<pb::BackupChunk, Status>>;

    async fn backup(
        &self,
        req: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let client = caller(&req)?;
        let mut name = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut name)
            .map_err(|_| Status::internal("the system random number generator failed"))?;
        let path = std::env::temp_dir().join(format!("vcn-backup-{}.tmp", hex::encode(name)));

        // The copy blocks writes (not reads) while it runs, and does file
        // I/O: keep it off the async workers.
        let (vault, file, rt) = (
            self.vault.clone(),
            path.clone(),
            tokio::runtime::Handle::current(),
        );
        let written = tokio::task::spawn_blocking(move || rt.block_on(vault.backup_to(&file)))
            .await
            .map_err(|e| Status::internal(format!("the backup task failed: {e}")))?;
        let entries = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(Status::unavailable(format!("backup failed: {e}")));
            }
        };
        tracing::info!(client = %client.name, entries, "backup taken");

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let result = async {
                let mut file = tokio::fs::File::open(&path).await?;
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = file.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<(), std::io::Error>(());
                    }
                    if tx
                        .send(Ok(pb::BackupChunk {
                            data: buf[..n].to_vec(),
                        }))
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
            }
            .await;
            if let Err(e) = result {
                let _ = tx
                    .send(Err(Status::internal(format!("reading the backup: {e}"))))
                    .await;
            }
            let _ = tokio::fs::remove_file(&path).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
