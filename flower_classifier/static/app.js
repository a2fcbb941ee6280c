// Send the chosen or dropped photo to POST /predict and draw its top names (up to 5) as bars, or,
// when the photo is none of the species the model knows, say so plainly (no bars that pretend).
"use strict";

const drop = document.getElementById("drop");
const preview = document.getElementById("preview");
const status = document.getElementById("status");
const results = document.getElementById("results");
const tta = document.getElementById("tta");  // test-time augmentation; starts as the server's default

fetch("/health").then((r) => r.json()).then((body) => { tta.checked = body.tta === true; }).catch(() => {});

function say(text, isError = false) {
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function show(predictions) {
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

async function classify(file) {
  if (!file) return;
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = "The photo: " + file.name;
  preview.hidden = false;
  results.replaceChildren();
  say("Looking at the photo…");
  const form = new FormData();
  form.append("file", file, file.name || "photo.jpg");
  try {
    const response = await fetch("/predict?tta=" + tta.checked, { method: "POST", body: form });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : response.statusText;
      say("Sorry: " + detail, true);
      return;
    }
    if (body.unknown) {
      say("This does not look like any of the " + body.species + " flowers this model knows (the nearest, " +
          body.predictions[0].name + ", is unlike the photos it learnt from).");
      return;
    }
    show(body.predictions);
    say("Most likely: " + body.predictions[0].name + ".");
  } catch (err) {
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
