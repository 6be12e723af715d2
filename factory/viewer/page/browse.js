// The cohort browser of `ctfactory view`: the manifest listed and filtered through
// /api/volumes, and a volume opened in the viewer (/viewer/viewer.js) with its record beside it.
"use strict";

const $ = (id) => document.getElementById(id);
const FILTERS = ["finding", "attribute", "sex", "age_min", "age_max", "prompt", "verified"];
let viewer = null;
let opening = null; // the id being opened: a later click wins

function say(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function filters() {
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    const value = $(name).value.trim();
    if (value) params.append(name, value);
  }
  return params;
}

function cell(text, title) {
  const td = document.createElement("td");
  td.textContent = text;
  if (title) td.title = title;
  return td;
}

/** {finding: {attribute: value}} as "finding: attribute value, ...; ..." */
function attributesText(attributes) {
  return Object.entries(attributes || {})
    .map(([finding, a]) => `${finding}: ${Object.entries(a).map(([k, x]) => `${k} ${x}`).join(", ")}`)
    .join("; ");
}

function verdict(v) {
  if (v.verified === null || v.verified === undefined) return "–";
  return v.verified ? "passed" : `failed: ${(v.verify_failed || []).join(", ")}`;
}

function row(v) {
  const tr = document.createElement("tr");
  tr.dataset.volumeId = v.volume_id;
  const link = document.createElement("a");
  link.href = `?volume=${encodeURIComponent(v.volume_id)}`;
  link.textContent = v.volume_id;
  link.addEventListener("click", (event) => {
    event.preventDefault();
    open(v.volume_id);
  });
  const id = document.createElement("td");
  id.append(link);
  tr.append(
    id,
    cell(v.findings.join(", ") || "no finding", attributesText(v.attributes)),
    cell(v.age),
    cell(v.sex),
    cell(verdict(v)),
    cell(v.prompt.length > 90 ? `${v.prompt.slice(0, 90)}…` : v.prompt, v.prompt),
  );
  tr.classList.toggle("selected", v.volume_id === opening);
  return tr;
}

async function list() {
  const body = $("volumes").tBodies[0];
  let response;
  try {
    response = await fetch(`/api/volumes?${filters()}`);
  } catch (err) {
    response = null;
    $("count").textContent = `The viewer's server does not answer: ${err}`;
  }
  if (!response || !response.ok) {
    if (response) $("count").textContent = await CtViewer.failure(response);
    $("count").className = "error";
    body.replaceChildren();
    return;
  }
  const data = await response.json();
  body.replaceChildren(...data.volumes.map(row));
  const more = data.volumes.length < data.matched ? `; the first ${data.volumes.length} shown` : "";
  $("count").textContent =
    `${data.matched} of ${data.committed} committed volumes (${data.planned} planned)${more}`;
  $("count").className = "";
}

function term(dl, name, value) {
  if (value === null || value === undefined || value === "") return;
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
  dl.append(dt, dd);
}

function showRecord(r) {
  const dl = $("record");
  dl.replaceChildren();
  term(dl, "Prompt", r.prompt);
  term(dl, "Findings", r.findings.join(", ") || "no finding");
  term(dl, "Attributes", attributesText(r.attributes));
  term(dl, "Age, sex", `${r.age}, ${r.sex}`);
  term(dl, "Verified", r.verified === null ? "not verified" : verdict(r));
  term(dl, "Verification scores", r.verify_scores);
  term(dl, "Seed", r.seed);
  term(dl, "Grid", `${r.shape.join(" × ")} voxels of ${r.spacing_mm.join(" × ")} mm`);
  term(dl, "Model hash", r.model_hash);
  term(dl, "Sampler", r.sampler);
  term(dl, "HU mean, 1st–99th percentile", `${r.hu_mean.toFixed(0)}, ${r.hu_p01} to ${r.hu_p99}`);
  term(dl, "Committed", r.committed_at);
  term(dl, "Made on", r.host);
}

function anatomyOf(id) {
  return async () => {
    const response = await fetch(`/api/volumes/${encodeURIComponent(id)}/anatomy.nii.gz`);
    if (!response.ok) throw new Error(await CtViewer.failure(response));
    const legend = JSON.parse(response.headers.get("X-Anatomy-Legend"));
    return { buffer: await response.arrayBuffer(), legend };
  };
}

async function open(id) {
  opening = id;
  history.replaceState(null, "", `?volume=${encodeURIComponent(id)}`);
  for (const tr of $("volumes").tBodies[0].rows) {
    tr.classList.toggle("selected", tr.dataset.volumeId === id);
  }
  $("volume").hidden = false;
  $("shown").hidden = true; // shown again only with a volume in it
  $("title").textContent = id;
  say(`Reading ${id}…`);
  const base = `/api/volumes/${encodeURIComponent(id)}`;
  try {
    const response = await fetch(base);
    if (!response.ok) return say(await CtViewer.failure(response), true);
    const record = await response.json();
    if (opening !== id) return;
    showRecord(record);
    $("download").href = `${base}/ct.nii.gz`;
    $("download").download = `${id}.nii.gz`;
    if (!CtViewer.supported()) {
      $("viewer").hidden = true;
      $("shown").hidden = false;
      return say("This browser has no WebGL2, which the 3D viewer needs: download the NIfTI", true);
    }
    const ct = await fetch(`${base}/ct.nii.gz`);
    if (!ct.ok) return say(await CtViewer.failure(ct), true);
    const buffer = await ct.arrayBuffer();
    if (opening !== id) return;
    $("shown").hidden = false; // laid out before NiiVue sizes its canvas
    viewer = viewer || new CtViewer.Viewer($("viewer"));
    await viewer.show(buffer, `${id}.nii.gz`, record.anatomy_sha256 ? anatomyOf(id) : null);
    say("");
  } catch (err) {
    $("shown").hidden = true;
    say(`Reading ${id} failed: ${err.message || err}`, true);
  }
}

async function init() {
  const response = await fetch("/api/cohort");
  if (!response.ok) {
    $("count").textContent = await CtViewer.failure(response);
    $("count").className = "error";
    return;
  }
  const cohort = await response.json();
  $("cohort").textContent =
    `Cohort ${cohort.cohort_id} at ${cohort.url}: ${cohort.planned} volumes planned, model ` +
    `${cohort.model} (${cohort.model_hash.slice(0, 12)}). Research use only; not for diagnosis.`;
  for (const f of cohort.findings) $("finding").append(new Option(f.name, f.id));
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    list();
  });
  $("filters").addEventListener("change", list);
  $("refresh").addEventListener("click", list);
  await list();
  const at = new URLSearchParams(location.search).get("volume") ||
    new URLSearchParams(location.hash.slice(1)).get("volume");
  if (at) await open(at);
}

init();
