// Sorting and filtering for the leaderboard tables; no libraries, works from file:// URLs.
// A heading's button sorts by that column (numbers by their data-value, empty cells last);
// a second click reverses. The filter box hides rows whose text lacks every typed word; the
// checkbox hides reported (not re-evaluated) rows.
"use strict";

function cellKey(row, column, numeric) {
  const cell = row.cells[column];
  const raw = cell.dataset.value;
  if (raw === undefined || raw === "") return null;
  return numeric ? parseFloat(raw) : raw.toLowerCase();
}

function compareKeys(a, b, direction) {
  // Missing values sort last whatever the direction.
  if (a === null || b === null) return (a === null) - (b === null);
  if (a < b) return -direction;
  if (a > b) return direction;
  return 0;
}

function sortTable(table, th) {
  const column = th.cellIndex;
  const numeric = th.dataset.type === "number";
  const before = th.getAttribute("aria-sort");
  // First click: numbers best-first (descending) except the rank; text A to Z.
  let direction = numeric && column !== 0 ? -1 : 1;
  if (before === "ascending") direction = -1;
  if (before === "descending") direction = 1;
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  // Stable sort: ties keep the current order.
  rows.sort((r1, r2) => compareKeys(cellKey(r1, column, numeric),
                                    cellKey(r2, column, numeric), direction));
  rows.forEach((row) => body.appendChild(row));
  table.querySelectorAll("th").forEach((h) => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", direction === 1 ? "ascending" : "descending");
}

function applyFilter(section) {
  const words = section.querySelector("input.filter").value.toLowerCase().split(/\s+/)
    .filter((w) => w.length > 0);
  const hideReported = section.querySelector("input.hide-reported").checked;
  let shown = 0;
  section.querySelectorAll("table.leaderboard tbody tr").forEach((row) => {
    const text = row.textContent.toLowerCase();
    const visible = words.every((w) => text.includes(w)) &&
      !(hideReported && row.dataset.source === "reported");
    row.hidden = !visible;
    if (visible) shown += 1;
  });
  section.querySelector(".count").textContent = shown + (shown === 1 ? " entry" : " entries");
}

document.querySelectorAll("section.board").forEach((section) => {
  const table = section.querySelector("table.leaderboard");
  table.querySelectorAll("thead th").forEach((th) => {
    th.querySelector("button").addEventListener("click", () => sortTable(table, th));
  });
  section.querySelector("input.filter").addEventListener("input", () => applyFilter(section));
  section.querySelector("input.hide-reported")
    .addEventListener("change", () => applyFilter(section));
});
