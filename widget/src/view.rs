//! Drawing: a card-shaped form that becomes the new card, notifications,
//! and the list of the cardholder's cards. Reads the model, turns clicks
//! into model calls; no logic of its own beyond layout.

use std::time::Instant;

use egui::{Align, Color32, CornerRadius, Frame, Layout, Margin, RichText, Stroke, Ui};
use time::OffsetDateTime;

use crate::form::Validity;
use crate::model::{actions_for, money, state_word, Command, Live, Model};

const CARD_WIDTH: f32 = 400.0;
const CARD_BLUE: Color32 = Color32::from_rgb(24, 52, 104);
const CARD_EDGE: Color32 = Color32::from_rgb(72, 110, 180);
const ON_CARD: Color32 = Color32::from_rgb(235, 240, 250);
const WARN: Color32 = Color32::from_rgb(255, 170, 120);
const ERROR_FILL: Color32 = Color32::from_rgb(90, 24, 24);
const OK_FILL: Color32 = Color32::from_rgb(22, 64, 40);

/// Draws one frame; commands for the backend go to `out`.
pub fn show(ui: &mut Ui, m: &mut Model, server: &str, now: Instant, out: &mut Vec<Command>) {
    egui::CentralPanel::default().show(ui, |ui| {
        header(ui, m, server, out);
        if let Some(e) = m.error.clone() {
            banner(ui, ERROR_FILL, |ui| {
                ui.label(RichText::new(e).color(Color32::WHITE));
                if ui.small_button("Dismiss").clicked() {
                    m.error = None;
                }
            });
        }
        notices(ui, m);
        ui.add_space(6.0);
        card(ui, m, now, out);
        ui.add_space(10.0);
        card_list(ui, m, out);
    });
}

fn header(ui: &mut Ui, m: &Model, server: &str, out: &mut Vec<Command>) {
    ui.horizontal(|ui| {
        ui.heading("Virtual cards");
        ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
            if ui.small_button("Refresh").clicked() {
                out.push(Command::Refresh);
            }
            let (dot, text) = match &m.live {
                Live::Connecting => (Color32::GRAY, "connecting…".to_string()),
                Live::Connected => (Color32::from_rgb(80, 200, 120), "live".to_string()),
                Live::Lost(_) => (WARN, "offline, retrying".to_string()),
                Live::Refused(_) => (Color32::RED, "not connected".to_string()),
            };
            ui.label(RichText::new(text).small())
                .on_hover_text(server.to_string());
            let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
            ui.painter().circle_filled(rect.center(), 4.5, dot);
        });
    });
    match &m.live {
        Live::Lost(why) | Live::Refused(why) if m.error.is_none() => {
            ui.label(
                RichText::new(format!("Live updates: {why}"))
                    .color(WARN)
                    .small(),
            );
        }
        _ => {}
    }
}

fn banner(ui: &mut Ui, fill: Color32, add: impl FnOnce(&mut Ui)) {
    Frame::new()
        .fill(fill)
        .corner_radius(CornerRadius::same(6))
        .inner_margin(Margin::same(8))
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.horizontal_wrapped(add);
        });
}

fn notices(ui: &mut Ui, m: &mut Model) {
    let mut dismiss = None;
    for n in &m.notices {
        let fill = if n.warning { ERROR_FILL } else { OK_FILL };
        banner(ui, fill, |ui| {
            ui.label(RichText::new(&n.text).color(Color32::WHITE));
            if ui.small_button("×").on_hover_text("Dismiss").clicked() {
                dismiss = Some(n.id);
            }
        });
    }
    if let Some(id) = dismiss {
        m.dismiss(id);
    }
}

/// The card: the form while there is no new number, the number after.
fn card(ui: &mut Ui, m: &mut Model, now: Instant, out: &mut Vec<Command>) {
    Frame::new()
        .fill(CARD_BLUE)
        .stroke(Stroke::new(1.0, CARD_EDGE))
        .corner_radius(CornerRadius::same(16))
        .inner_margin(Margin::same(18))
        .show(ui, |ui| {
            ui.set_width(CARD_WIDTH - 36.0);
            ui.visuals_mut().override_text_color = Some(ON_CARD);
            ui.horizontal(|ui| {
                ui.label(RichText::new("VIRTUAL CARD").strong().small());
                ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
                    funding_chooser(ui, m);
                });
            });
            ui.add_space(10.0);
            number_area(ui, m, now);
            ui.add_space(10.0);
            ui.separator();
            form(ui, m, out);
        });
}

fn funding_chooser(ui: &mut Ui, m: &mut Model) {
    let selected = m
        .funding
        .get(m.form.funding)
        .cloned()
        .unwrap_or_else(|| "no card configured".into());
    // Right to left: the chooser, then its label on its left.
    let chooser = egui::ComboBox::from_id_salt("funding")
        .selected_text(selected)
        .show_ui(ui, |ui| {
            for (i, f) in m.funding.iter().enumerate() {
                ui.selectable_value(&mut m.form.funding, i, f);
            }
        })
        .response;
    let label = ui.label(RichText::new("from").small());
    chooser.labelled_by(label.id);
}

fn number_area(ui: &mut Ui, m: &mut Model, now: Instant) {
    let big = |t: &str| {
        RichText::new(t)
            .monospace()
            .size(22.0)
            .color(Color32::WHITE)
    };
    let Some(r) = &m.revealed else {
        let shown = match &m.last_issued {
            Some(c) => format!("{}  (hidden)", c.masked_pan),
            None => "•••• •••• •••• ••••".to_string(),
        };
        ui.label(big(&shown));
        ui.label(RichText::new("MM/YY   CVV •••").monospace());
        return;
    };
    let mut copy = None;
    let mut hide = false;
    ui.horizontal(|ui| {
        ui.label(big(&r.grouped_number()));
        if ui.small_button("Copy number").clicked() {
            copy = Some(r.number());
        }
    });
    ui.horizontal(|ui| {
        ui.label(RichText::new(format!("Expires {}", r.expiry())).monospace());
        if ui.small_button("Copy expiry").clicked() {
            copy = Some(zeroize::Zeroizing::new(r.expiry()));
        }
        ui.add_space(12.0);
        ui.label(RichText::new(format!("CVV {}", r.cvv().as_str())).monospace());
        if ui.small_button("Copy CVV").clicked() {
            copy = Some(r.cvv());
        }
    });
    ui.horizontal(|ui| {
        let left = r.left(now, m.reveal_for).as_secs();
        ui.label(RichText::new(format!("Hidden in {left} s")).small());
        if ui.small_button("Hide now").clicked() {
            hide = true;
        }
    });
    if let Some(text) = copy {
        ui.ctx().copy_text(text.to_string());
        m.copied();
    }
    if hide {
        m.hide();
    }
}

fn form(ui: &mut Ui, m: &mut Model, out: &mut Vec<Command>) {
    egui::Grid::new("form")
        .num_columns(2)
        .spacing([10.0, 8.0])
        .show(ui, |ui| {
            let label = ui.label("Amount");
            ui.horizontal(|ui| {
                ui.add(
                    egui::TextEdit::singleline(&mut m.form.amount)
                        .hint_text("e.g. 25.00")
                        .desired_width(110.0),
                )
                .labelled_by(label.id);
                let cur = ui.label("Currency");
                ui.add(egui::TextEdit::singleline(&mut m.form.currency).desired_width(44.0))
                    .labelled_by(cur.id);
            });
            ui.end_row();

            ui.label("Valid for");
            ui.horizontal(|ui| {
                for v in Validity::ALL {
                    ui.selectable_value(&mut m.form.validity, v, v.label());
                }
            });
            ui.end_row();
            if m.form.validity == Validity::Custom {
                let label = ui.label("Custom");
                ui.add(
                    egui::TextEdit::singleline(&mut m.form.custom)
                        .hint_text("30m, 12h or 3d")
                        .desired_width(110.0),
                )
                .labelled_by(label.id);
                ui.end_row();
            }

            let label = ui.label("Shop");
            ui.vertical(|ui| {
                ui.add_enabled(
                    !m.form.lock_first,
                    egui::TextEdit::singleline(&mut m.form.merchant)
                        .hint_text("any shop (optional)")
                        .desired_width(200.0),
                )
                .labelled_by(label.id);
                ui.add_enabled(
                    m.form.merchant.trim().is_empty(),
                    egui::Checkbox::new(&mut m.form.lock_first, "only the first shop that uses it"),
                );
            });
            ui.end_row();
        });
    if let Some(e) = &m.form_error {
        ui.label(RichText::new(e.to_string()).color(WARN));
    }
    ui.add_space(4.0);
    ui.horizontal(|ui| {
        let button = egui::Button::new(RichText::new("Generate").strong().size(16.0))
            .fill(Color32::from_rgb(40, 120, 80))
            .min_size(egui::vec2(120.0, 30.0));
        if ui.add_enabled(!m.issuing, button).clicked() {
            if let Some(cmd) = m.generate(OffsetDateTime::now_utc()) {
                out.push(cmd);
            }
        }
        if m.issuing {
            ui.spinner();
            ui.label("Asking the card service…");
        }
    });
}

fn card_list(ui: &mut Ui, m: &mut Model, out: &mut Vec<Command>) {
    ui.heading("Your cards");
    if !m.loaded {
        ui.label("Loading…");
        return;
    }
    if m.cards.is_empty() {
        ui.label("No cards yet.");
        return;
    }
    let mut clicked = None;
    egui::ScrollArea::vertical().show(ui, |ui| {
        egui::Grid::new("cards")
            .num_columns(5)
            .striped(true)
            .spacing([12.0, 6.0])
            .show(ui, |ui| {
                ui.label(RichText::new("Card").strong());
                ui.label(RichText::new("State").strong());
                ui.label(RichText::new("Spent").strong());
                ui.label(RichText::new("Left").strong());
                ui.label("");
                ui.end_row();
                for c in &m.cards {
                    ui.label(RichText::new(crate::model::last4_of(&c.masked_pan)).monospace())
                        .on_hover_text(&c.masked_pan);
                    ui.label(state_word(c.state));
                    ui.label(money(&c.spent));
                    ui.label(money(&c.remaining));
                    ui.horizontal(|ui| {
                        let busy = m.busy.contains(&c.card_id);
                        for &a in actions_for(c.state) {
                            let text = if m.confirm_close.as_deref() == Some(c.card_id.as_str())
                                && a == crate::model::Action::Close
                            {
                                "Really close?"
                            } else {
                                a.label()
                            };
                            let b = ui
                                .add_enabled(!busy, egui::Button::new(text).small())
                                .on_hover_text(format!("{} card {}", a.label(), c.masked_pan));
                            if b.clicked() {
                                clicked = Some((a, c.card_id.clone()));
                            }
                        }
                    });
                    ui.end_row();
                }
            });
    });
    if let Some((a, id)) = clicked {
        if let Some(cmd) = m.change(a, &id) {
            out.push(cmd);
        }
    }
}
