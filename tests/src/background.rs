//! A client program run in the background by a test (etcdctl, the
//! etcd-client check program), its stdout and stderr in files so that a
//! test can wait for a line while it runs and show everything when it
//! fails. SIGKILLed when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often the waits below look again.
const POLL: Duration = Duration::from_millis(50);

/// A running (or exited) background program.
pub struct Background {
    name: String,
    command: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
}

impl Background {
    /// Starts `cmd` in `dir`, its output in `<dir>/<name>.out` and
    /// `<name>.err`. Its stdin is what `cmd` says (the default: inherited);
    /// give it `Stdio::piped()` to [`close_stdin`](Self::close_stdin) later.
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Background {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let command = format!("{cmd:?}");
        let child = cmd
            .current_dir(dir)
            .stdout(File::create(&out).expect("create the stdout file"))
            .stderr(File::create(&err).expect("create the stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
        Background {
            name: name.to_string(),
            command,
            child,
            out,
            err,
            status: None,
        }
    }

    /// Starts `cmd` with its stdin closed (see [`spawn`](Self::spawn)).
    pub fn spawn_without_input(mut cmd: Command, dir: &Path, name: &str) -> Background {
        cmd.stdin(Stdio::null());
        Background::spawn(cmd, dir, name)
    }

    /// What it printed so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Its name, command, state and output, for a failure message.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {})\nstdout: {}\nstderr: {}",
            self.name,
            self.command,
            match self.status {
                Some(s) => s.to_string(),
                None => "running".into(),
            },
            self.stdout(),
            self.stderr()
        )
    }

    /// Its exit status, once it exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Closes its stdin (when it was piped): end of input.
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Waits (bounded) until its stdout contains `text`; panics if it exits
    /// first.
    pub async fn wait_output(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.exited();
            if self.stdout().contains(text) {
                return;
            }
            assert!(
                exited.is_none(),
                "exited without printing {text:?}: {}",
                self.describe()
            );
            assert!(
                Instant::now() < deadline,
                "did not print {text:?} within {timeout:?}: {}",
                self.describe()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (bounded) for it to exit; panics unless it succeeded.
    pub async fn wait_success(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                assert!(status.success(), "failed: {}", self.describe());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {timeout:?}: {}",
                self.describe()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILLs it (when it still runs) and reaps it.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}
