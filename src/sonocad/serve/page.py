"""The web page of `sonocad serve`: one self-contained HTML document (no resource from anywhere else). It asks
for the server's access token when the API answers 401, and keeps it for the browser tab (sessionStorage)."""

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sonocad</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;max-width:900px;margin:1.5em auto;color:#222;padding:0 1em}
.note{background:#fff4e0;padding:.6em;border-left:4px solid #e90}#drop{border:2px dashed #888;padding:2em;
text-align:center;margin:1em 0;cursor:pointer}#drop.over{background:#eef}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}#err{color:#b00}img{max-width:100%}
#outline,#heatmap{width:49%;vertical-align:top;image-rendering:auto}</style></head>
<body><h1>sonocad</h1><p class="note" id="notice">Research tool, not a diagnostic device: its output is not a
diagnosis.</p><p class="note" id="site-notice" hidden></p>
<div id="drop">Drop a scan here, or <label>choose one <input type="file" id="file"></label>
<br><small>PNG, JPEG, BMP, TIFF or DICOM, at most 20 MB; it is analysed in memory, not stored.</small></div>
<form id="auth" hidden><label>This server asks for its access token: <input type="password" id="token"
autocomplete="off"></label> <button>Use it</button></form>
<p id="err" role="alert"></p><div id="result" hidden><h2>Result</h2>
<p>Probability of <span id="positive"></span>: <b id="prob"></b> &nbsp;(<span id="predicted"></span>)</p>
<table id="decisions"></table><p><img id="outline" alt="the predicted lesion outline over the scan" hidden>
<img id="heatmap" alt="heatmap over the scan"></p><p id="outline-caption" hidden><small>Left: the lesion the model
outlines (red, P(lesion) &ge; 0.5); right: where it looked (Grad-CAM).</small></p></div>
<h2>Model card</h2><div id="card">loading...</div>
<script>
const $ = (id) => document.getElementById(id);
function row(cells, head) { const tr = document.createElement("tr"); for (const c of cells) {
  const td = document.createElement(head ? "th" : "td"); td.textContent = c; tr.appendChild(td); } return tr; }
let card = null;
let token = sessionStorage.getItem("sonocad-token") || "";
const auth = () => token ? {"Authorization": "Bearer " + token} : {};
function askToken() { $("auth").hidden = false; $("token").focus(); }
$("auth").addEventListener("submit", (e) => { e.preventDefault(); token = $("token").value.trim();
  sessionStorage.setItem("sonocad-token", token); $("auth").hidden = true; loadCard(); });
async function loadCard() {
  const r = await fetch("/api/model", {headers: auth()});
  if (r.status === 401) { askToken(); return; }
  const c = await r.json(); card = c; const box = $("card"); box.textContent = "";
  const t = document.createElement("table");
  t.appendChild(row(["model", c.model + " (" + c.input_size + " px)"]));
  t.appendChild(row(["classes", c.classes.join(", ")]));
  t.appendChild(row(["trained on", JSON.stringify(c.trained_on)]));
  const auc = (f) => f && typeof f.auc === "number" ? "n = " + f.n + ", AUC " + f.auc.toFixed(3) + (f.auc_ci ?
    " (95% CI " + f.auc_ci[0].toFixed(3) + "-" + f.auc_ci[1].toFixed(3) + ")" : "") : "n/a";
  if (c.measured) { t.appendChild(row(["measured on " + c.measured.on, auc(c.measured)]));
    for (const [name, f] of Object.entries(c.measured.parts || {})) t.appendChild(row(["  of which " + name, auc(f)])); }
  t.appendChild(row(["intended use", c.intended_use])); box.appendChild(t);
  if (c.chosen_on) { const h = document.createElement("p"); h.textContent = "Operating points, with the figures " +
      "they had where they were chosen (" + c.chosen_on.data + "):"; box.appendChild(h);
    const p = document.createElement("table"); p.id = "card-points";
    p.appendChild(row(["operating point", "threshold", "sensitivity (95% CI)", "specificity (95% CI)", "promise"], true));
    const ci = (v, c) => typeof v === "number" ? v.toFixed(3) + (c ? " (" + c[0].toFixed(2) + "-" + c[1].toFixed(2) + ")" : "") : "n/a";
    for (const [name, op] of Object.entries(c.chosen_on.operating_points)) {
      if (!op || typeof op !== "object") continue;
      p.appendChild(row([name, ci(op.threshold), ci(op.sensitivity, op.sensitivity_ci), ci(op.specificity, op.specificity_ci),
        op.promised_sensitivity !== undefined ? "sensitivity \u2265 " + op.promised_sensitivity.toFixed(3) + " on new cases" : ""])); }
    box.appendChild(p); }
  if (c.site_notice) { $("site-notice").textContent = "Note: " + c.site_notice + "."; $("site-notice").hidden = false; } }
loadCard();
async function send(file) {
  $("err").textContent = ""; const form = new FormData(); form.append("file", file);
  const r = await fetch("/api/predict", {method: "POST", body: form, headers: auth()});
  if (r.status === 401) { askToken(); return; }
  const j = await r.json();
  if (!r.ok) { $("err").textContent = j.error || ("error " + r.status); $("result").hidden = true; return; }
  $("positive").textContent = card ? card.positive || j.predicted : "";
  $("prob").textContent = j.probability !== undefined ? j.probability.toFixed(4) : JSON.stringify(j.probabilities);
  $("predicted").textContent = "called " + j.predicted + " at the default operating point";
  const t = $("decisions"); t.textContent = ""; const chosen = card && card.chosen_on ? card.chosen_on : null;
  t.appendChild(row(["operating point", "threshold", "decision", "sensitivity / specificity where chosen (" +
    (chosen ? chosen.data : "not recorded") + ")", "sensitivity / specificity measured on " +
    (card && card.measured ? card.measured.on : "no data")], true));
  const pair = (op) => op && typeof op.sensitivity === "number" && typeof op.specificity === "number" ?
    op.sensitivity.toFixed(3) + " / " + op.specificity.toFixed(3) : "n/a";
  for (const [name, d] of Object.entries(j.decisions || {})) {
    const val = chosen ? chosen.operating_points[name] : null;
    const test = card && card.measured ? card.measured.operating_points[name] : null;
    const promise = val && val.promised_sensitivity !== undefined ? " (promises sensitivity \u2265 " +
      val.promised_sensitivity.toFixed(3) + " on new cases)" : "";
    t.appendChild(row([name, d.threshold.toFixed(3), d.decision, pair(val) + promise, pair(test)])); }
  if (j.heatmap_png) { $("heatmap").src = "data:image/png;base64," + j.heatmap_png; $("heatmap").hidden = false; }
  else { $("heatmap").hidden = true; }
  $("outline").hidden = $("outline-caption").hidden = !j.outline_png;
  if (j.outline_png) $("outline").src = "data:image/png;base64," + j.outline_png;
  $("result").hidden = false; }
$("file").addEventListener("change", (e) => { if (e.target.files[0]) send(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); });
</script></body></html>"""
