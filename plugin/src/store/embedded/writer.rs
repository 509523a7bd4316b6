//! Group commit: one thread owns the write connection and runs every write waiting at that
//! moment in one transaction (one fsync), each in its own savepoint so one failure does not
//! undo the others. Callers hear back only after the commit returned.

use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::error::sql_error;
use crate::store::StoreError;

/// A unit of work for the writer thread.
pub(super) trait Job: Send {
    /// Runs inside the batch transaction.
    fn run(&mut self, conn: &Connection);
    /// Reports the outcome once the batch committed (or failed to).
    fn finish(self: Box<Self>, committed: Result<(), Arc<StoreError>>);
}

/// Runs after the commit, in batch order, before the caller hears back.
pub(super) type AfterCommit<T> = Box<dyn FnOnce(&T) + Send>;

/// A closure and the channel its result goes back on.
pub(super) struct Call<T, F> {
    work: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    after_commit: Option<AfterCommit<T>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Call<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    /// Wraps `work`; the receiver yields its result after commit, and `after_commit` sees a
    /// successful one first.
    pub(super) fn job(
        work: F,
        after_commit: Option<AfterCommit<T>>,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<T, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        let call = Call {
            work: Some(work),
            outcome: None,
            after_commit,
            reply,
        };
        (Box::new(call), rx)
    }
}

impl<T, F> Job for Call<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) {
        let Some(work) = self.work.take() else {
            return;
        };
        if let Err(e) = conn.execute_batch("SAVEPOINT job") {
            self.outcome = Some(Err(sql_error(e)));
            return;
        }
        let outcome = work(conn);
        let end = if outcome.is_ok() {
            "RELEASE job"
        } else {
            "ROLLBACK TO job; RELEASE job"
        };
        self.outcome = Some(match conn.execute_batch(end) {
            Ok(()) => outcome,
            Err(e) => Err(sql_error(e)),
        });
    }

    fn finish(self: Box<Self>, committed: Result<(), Arc<StoreError>>) {
        let result = match committed {
            Ok(()) => self
                .outcome
                .unwrap_or_else(|| Err(StoreError::Unavailable("the write did not run".into()))),
            Err(cause) => Err(StoreError::of_batch(&cause)),
        };
        if let (Ok(value), Some(after_commit)) = (&result, self.after_commit) {
            after_commit(value);
        }
        // The caller may have gone away (client disconnected); the write stands regardless.
        let _ = self.reply.send(result);
    }
}

/// Runs batches until every sender is dropped, then returns after the last commit.
pub(super) fn run(conn: Connection, mut jobs: mpsc::Receiver<Box<dyn Job>>, max_batch: usize) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let committed = commit_batch(&conn, &mut batch);
        if let Err(e) = &committed {
            tracing::error!(error = %e, jobs = batch.len(), "store batch failed");
        }
        for job in batch.drain(..) {
            job.finish(committed.clone());
        }
    }
}

fn commit_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), Arc<StoreError>> {
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| Arc::new(sql_error(e)))?;
    for job in batch.iter_mut() {
        job.run(conn);
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        // The transaction may still be open; leave the connection usable for the next batch.
        let _ = conn.execute_batch("ROLLBACK");
        return Err(Arc::new(sql_error(e)));
    }
    Ok(())
}
