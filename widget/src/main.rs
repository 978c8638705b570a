//! `vcn-widget [--config FILE]`: the desktop widget.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use vcn_widget::config::{self, KEY_ENV};
use vcn_widget::{SystemClock, WidgetApp, WINDOW_SIZE};

const USAGE: &str = "usage: vcn-widget [--config FILE]

Makes single-use virtual card numbers from a small window.
FILE (mode 0600) names the service, the API key and your funding cards;
default: $XDG_CONFIG_HOME/vcn-widget/config.toml. The key may be given in
VCN_WIDGET_KEY instead. See the README's widget section.";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut path: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => match args.next() {
                Some(p) => path = Some(PathBuf::from(p)),
                None => return usage(),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
        }
    }
    let Some(path) = path.or_else(config::default_path) else {
        eprintln!("vcn-widget: no --config given and no home directory to look in");
        return ExitCode::from(2);
    };
    let settings = match config::load(&path, std::env::var(KEY_ENV).ok()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vcn-widget: {e}");
            return ExitCode::from(2);
        }
    };
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("vcn — virtual cards")
            .with_inner_size(WINDOW_SIZE)
            .with_min_inner_size([420.0, 560.0]),
        ..Default::default()
    };
    let run = eframe::run_native(
        "vcn-widget",
        options,
        Box::new(move |cc| {
            cc.egui_ctx.set_theme(egui::Theme::Dark);
            Ok(Box::new(WidgetApp::new(settings, Arc::new(SystemClock))))
        }),
    );
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vcn-widget: cannot open the window: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}
