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
    settings: Settings,
    /// Started on the first frame, when the window's context is known.
    backend: Option<Backend>,
    clock: Arc<dyn Clock>,
}

impl WidgetApp {
    pub fn new(settings: Settings, clock: Arc<dyn Clock>) -> WidgetApp {
        WidgetApp {
            model: Model::new(&settings),
            settings,
            backend: None,
            clock,
        }
    }

    /// One frame: take in what the backend said, hide what is due, draw.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let backend = self.backend.get_or_insert_with(|| {
            // The backend loads the cards and follows events; each reply
            // repaints the window.
            let repaint = ui.ctx().clone();
            let b = Backend::start(&self.settings, Arc::new(move || repaint.request_repaint()));
            b.send(Command::Refresh);
            b
        });
        let now = self.clock.now();
        while let Some(reply) = backend.try_recv() {
            self.model.apply(reply, now);
        }
        if let Some(left) = self.model.tick(now) {
            // Wake up when the number is due to disappear, and once a
            // second for the countdown.
            ui.ctx()
                .request_repaint_after(left.min(Duration::from_secs(1)));
        }
        let mut out = Vec::new();
        crate::view::show(ui, &mut self.model, &self.settings.server, now, &mut out);
        for cmd in out {
            backend.send(cmd);
        }
        if self.model.take_clear_clipboard() {
            ui.ctx().copy_text(String::new());
        }
    }
}

impl eframe::App for WidgetApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}
