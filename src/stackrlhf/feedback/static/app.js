// Keyboard-first labelling: 1-5 rate the highlighted scale and move on; letters pick the better answer.
(function () {
  const form = document.getElementById("label-form");
  if (!form) return;
  const id = document.getElementById("client_id");
  if (window.crypto && crypto.randomUUID && !id.dataset.kept) id.value = crypto.randomUUID();
  document.getElementById("started").value = String(Date.now());
  const groups = Array.from(form.querySelectorAll("fieldset.rating"));
  let cursor = groups.findIndex((g) => !g.querySelector("input:checked"));
  if (cursor < 0) cursor = groups.length;
  function paint() {
    groups.forEach((g, i) => g.classList.toggle("current", i === cursor));
    form.querySelector("fieldset.best").classList.toggle("current", cursor >= groups.length);
  }
  groups.forEach((g, i) => g.addEventListener("change", () => { cursor = i + 1; paint(); }));
  function submit(skip) {
    document.getElementById("skip").value = skip ? "1" : "0";
    HTMLFormElement.prototype.submit.call(form);  // immune to a control named "submit" shadowing form.submit
  }
  document.getElementById("skip-button").addEventListener("click", () => submit(true));
  document.addEventListener("keydown", (e) => {
    const typing = e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT" && e.target.type === "password";
    if (typing) { if (e.key === "Escape") e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (/^[1-5]$/.test(e.key) && cursor < groups.length) {
      groups[cursor].querySelector(`input[value="${e.key}"]`).checked = true;
      cursor += 1; paint(); e.preventDefault();
    } else if (e.key === "Backspace") {
      cursor = Math.max(cursor - 1, 0); paint(); e.preventDefault();
    } else if (e.key === "Enter") {
      submit(false); e.preventDefault();
    } else if (e.key === "s") {
      submit(true); e.preventDefault();
    } else if (e.key === "/") {
      document.getElementById("comment").focus(); e.preventDefault();
    } else {
      const choice = form.querySelector(`fieldset.best input[data-key="${e.key}"]`);
      if (choice) { choice.checked = true; e.preventDefault(); }
    }
  });
  paint();
})();
