// Send the chosen or dropped photo to POST /predict and show the answer as a heading: the most likely
// species, with its top names (up to 5) as bars below, or, when the photo is none of the species the
// model knows, that plainly (no bars that pretend). The status line is for progress and errors only.
"use strict";

const drop = document.getElementById("drop");
const preview = document.getElementById("preview");
const status = document.getElementById("status");
const answer = document.getElementById("answer");
const results = document.getElementById("results");
const tta = document.getElementById("tta");  // test-time augmentation; starts as the server's default

fetch("/health").then((r) => r.json()).then((body) => { tta.checked = body.tta === true; }).catch(() => {});

function say(text, isError = false) {
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function hidePreview() {
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
}
preview.addEventListener("error", hidePreview);  // a file the browser cannot draw: no broken-image icon

function showAnswer(kind, title, detail) {
  answer.className = "answer " + kind;
  answer.querySelector("h2").textContent = title;
  answer.querySelector("p").textContent = detail;
  answer.hidden = false;
}

function showBars(predictions) {
  results.replaceChildren(...predictions.map((p) => {
    const li = document.createElement("li");
    const pct = (100 * p.probability).toFixed(1) + "%";
    li.innerHTML = '<div class="row"><span class="name"></span><span class="pct"></span></div>' +
                   '<div class="bar"><span></span></div>';
    li.querySelector(".name").textContent = p.name;
    li.querySelector(".pct").textContent = pct;
    li.querySelector(".bar span").style.width = pct;
    li.title = "category " + p.category;
    return li;
  }));
}

function show(body) {
  const top = body.predictions[0];
  if (body.unknown) {
    // A kind of unknown (not a flower, a flower it was not trained on), when the server says one.
    const kind = typeof body.kind === "string" && body.kind ? " (" + body.kind + ")" : "";
    showAnswer("unknown", "Not one of the " + body.species + " flowers I know" + kind,
               "This photo is unlike the photos this model learnt from. The nearest species, " + top.name +
               ", is not the answer.");
    return;
  }
  showAnswer("known", top.name, (100 * top.probability).toFixed(1) + "% likely" +
             (body.predictions.length > 1 ? "; the nearest species below" : ""));
  showBars(body.predictions);
}

async function classify(file) {
  if (!file) return;
  hidePreview();
  preview.src = URL.createObjectURL(file);
  preview.alt = "The photo: " + file.name;
  preview.hidden = false;
  answer.hidden = true;
  results.replaceChildren();
  say("Looking at the photo…");
  const form = new FormData();
  form.append("file", file, file.name || "photo.jpg");
  try {
    const response = await fetch("/predict?tta=" + tta.checked, { method: "POST", body: form });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : response.statusText;
      hidePreview();
      say("Sorry: " + detail, true);
      return;
    }
    say("");
    show(body);
  } catch (err) {
    hidePreview();
    say("Could not reach the server (" + err.message + ").", true);
  }
}

for (const id of ["camera", "picker"]) {
  const input = document.getElementById(id);
  input.addEventListener("change", () => { classify(input.files[0]); input.value = ""; });
}
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => classify(e.dataTransfer.files[0]));
