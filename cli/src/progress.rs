//! Progress bars on stderr (only when it is a terminal) and Ctrl-C handling.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Reports engine progress as a bar and turns SIGINT/SIGTERM into a
/// cancellation the engine polls, so that temp files are removed on the way
/// out instead of being left behind.
pub struct Reporter {
    bar: Option<ProgressBar>,
    cancelled: Arc<AtomicBool>,
}

impl Reporter {
    pub fn new(quiet: bool) -> Self {
        let cancelled = Arc::new(AtomicBool::new(false));
        let flag = cancelled.clone();
        // Only one handler can exist per process; a second registration
        // (tests calling twice) keeps the first, which is fine.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Reporter { bar, cancelled }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl iukfarm_engine::Progress for Reporter {
    fn phase(&self, name: &str, total: u64) {
        if let Some(b) = &self.bar {
            b.set_prefix(name.to_string());
            b.set_length(total);
            b.set_position(0);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}
