//! The widget as a whole: model, backend and clock, drawn by [`crate::view`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::config::Settings;
use crate::model::{Command, Model};

/// Where the widget's time comes from: the system's, or one a test moves.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that stands still until told to move.
#[derive(Clone)]
pub struct ManualClock(Arc<Mutex<Instant>>);

impl ManualClock {
    pub fn new() -> ManualClock {
        ManualClock(Arc::new(Mutex::new(Instant::now())))
    }

    pub fn advance(&self, by: Duration) {
        if let Ok(mut t) = self.0.lock() {
            *t += by;
        }
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.0
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|e| *e.into_inner())
    }
}

pub struct WidgetApp {
    pub model: Model,
    backend: Backend,
    clock: Arc<dyn Clock>,
    pub server: String,
}

impl WidgetApp {
    /// Starts the backend (which loads the cards and follows events);
    /// replies repaint `ctx`.
    pub fn new(settings: &Settings, ctx: &egui::Context, clock: Arc<dyn Clock>) -> WidgetApp {
        let repaint = ctx.clone();
        let backend = Backend::start(settings, Arc::new(move || repaint.request_repaint()));
        backend.send(Command::Refresh);
        WidgetApp {
            model: Model::new(settings),
            backend,
            clock,
            server: settings.server.clone(),
        }
    }

    /// One frame: take in what the backend said, hide what is due, draw.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let now = self.clock.now();
        while let Some(reply) = self.backend.try_recv() {
            self.model.apply(reply, now);
        }
        if let Some(left) = self.model.tick(now) {
            // Wake up when the number is due to disappear, and once a
            // second for the countdown.
            ui.ctx()
                .request_repaint_after(left.min(Duration::from_secs(1)));
        }
        let mut out = Vec::new();
        crate::view::show(ui, &mut self.model, &self.server, now, &mut out);
        for cmd in out {
            self.backend.send(cmd);
        }
    }
}

impl eframe::App for WidgetApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}
