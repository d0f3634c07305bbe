//! A pipeline's DAG drawn as SVG for the dashboard: a layered layout (each job one layer below
//! its deepest parent; in a layer, jobs ordered by where their parents are), each job a box
//! whose class names its state, so the page's style sheet colours it (light and dark) and a
//! script can find it (`g.job[data-worker]`).

use std::collections::HashMap;
use std::fmt::Write as _;

use pypelinin_common::pipeline::{JobIndex, Pipeline};

const BOX_W: f64 = 150.0;
const BOX_H: f64 = 36.0;
const GAP_X: f64 = 30.0;
const GAP_Y: f64 = 50.0;
const MARGIN: f64 = 10.0;
/// The longest worker name drawn whole; longer ones end with "…" (the title has it whole).
const LABEL_CHARS: usize = 20;

/// Where each job goes: its layer (row) and place in the row.
fn layers(p: &Pipeline) -> Vec<Vec<JobIndex>> {
    let order = p.topological_order();
    let mut layer_of: HashMap<JobIndex, usize> = HashMap::new();
    for &job in &order {
        let layer = p
            .parents(job)
            .filter_map(|parent| layer_of.get(&parent))
            .map(|l| l + 1)
            .max()
            .unwrap_or(0);
        layer_of.insert(job, layer);
    }
    let depth = layer_of.values().max().map_or(0, |d| d + 1);
    let mut rows: Vec<Vec<JobIndex>> = vec![Vec::new(); depth];
    for &job in &order {
        rows[layer_of[&job]].push(job);
    }
    // One pass of the barycentre heuristic: a job sits under the mean place of its parents,
    // which keeps most edges short and uncrossed.
    for layer in 1..rows.len() {
        let place: HashMap<JobIndex, usize> = rows[layer - 1]
            .iter()
            .enumerate()
            .map(|(i, j)| (*j, i))
            .collect();
        let key = |job: &JobIndex| {
            let places: Vec<usize> = p
                .parents(*job)
                .filter_map(|parent| place.get(&parent).copied())
                .collect();
            if places.is_empty() {
                f64::MAX
            } else {
                places.iter().sum::<usize>() as f64 / places.len() as f64
            }
        };
        rows[layer].sort_by(|a, b| key(a).total_cmp(&key(b)));
    }
    rows
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The DAG of `p` as SVG; `state` names each job's state (by worker): the box's class is
/// `job state-<state>`.
pub fn svg(p: &Pipeline, state: impl Fn(&str) -> &'static str) -> String {
    let rows = layers(p);
    let widest = rows.iter().map(Vec::len).max().unwrap_or(1).max(1) as f64;
    let width = MARGIN * 2.0 + widest * BOX_W + (widest - 1.0) * GAP_X;
    let height = MARGIN * 2.0 + rows.len() as f64 * (BOX_H + GAP_Y) - GAP_Y;
    let mut at: HashMap<JobIndex, (f64, f64)> = HashMap::new();
    for (r, row) in rows.iter().enumerate() {
        let row_width = row.len() as f64 * BOX_W + (row.len() as f64 - 1.0) * GAP_X;
        let left = (width - row_width) / 2.0;
        for (i, job) in row.iter().enumerate() {
            let x = left + i as f64 * (BOX_W + GAP_X);
            let y = MARGIN + r as f64 * (BOX_H + GAP_Y);
            at.insert(*job, (x, y));
        }
    }
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="dag" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead"/></marker></defs>"#
    );
    for (from, to) in p.edges() {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (at.get(&from), at.get(&to)) else {
            continue;
        };
        let (sx, sy) = (x1 + BOX_W / 2.0, y1 + BOX_H);
        let (ex, ey) = (x2 + BOX_W / 2.0, y2);
        let mid = (sy + ey) / 2.0;
        let _ = write!(
            out,
            r#"<path class="edge" d="M {sx} {sy} C {sx} {mid}, {ex} {mid}, {ex} {ey}" marker-end="url(#arrow)"/>"#
        );
    }
    for (index, job) in p.jobs() {
        let Some(&(x, y)) = at.get(&index) else {
            continue;
        };
        let name = escape(&job.worker);
        let label: String = if job.worker.chars().count() > LABEL_CHARS {
            let cut: String = job.worker.chars().take(LABEL_CHARS - 1).collect();
            escape(&format!("{cut}…"))
        } else {
            name.clone()
        };
        let state = state(&job.worker);
        let _ = write!(
            out,
            r#"<g class="job state-{state}" data-worker="{name}" data-state="{state}" tabindex="0"><title>{name}: {state}</title><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6"/><text x="{}" y="{}">{label}</text></g>"#,
            x + BOX_W / 2.0,
            y + BOX_H / 2.0 + 5.0,
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_job_is_one_box_below_its_parents_with_its_state() {
        let p = Pipeline::builder()
            .edges("Download", ["Text", "Links"])
            .edges("Text", ["Summary"])
            .edges("Links", ["Summary"])
            .job("Lonely <one>")
            .build()
            .unwrap();
        let rows = layers(&p);
        let names: Vec<Vec<&str>> = rows
            .iter()
            .map(|r| r.iter().map(|j| p.job(*j).worker.as_str()).collect())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names[0].contains(&"Download") && names[0].contains(&"Lonely <one>"));
        assert_eq!(names[2], ["Summary"]);
        let text = svg(&p, |w| if w == "Text" { "running" } else { "queued" });
        assert_eq!(text.matches("<g class=\"job ").count(), 5);
        assert_eq!(text.matches("class=\"edge\"").count(), 4);
        assert!(text.contains(r#"<g class="job state-running" data-worker="Text""#));
        assert!(text.contains("Lonely &lt;one&gt;"), "names are escaped");
    }
}
