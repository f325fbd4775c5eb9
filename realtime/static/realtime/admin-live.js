// admin-live.js: the live admin change form. No dependencies, no build step.
//
// realtime/admin_toasts.html loads it on a change form, with the page's state in
// <script id="realtime-change-form" type="application/json"> ({topic, model, pk, url, time_zone}).
// The page's client (window.realtimeAdmin) is subscribed to the object's topic and started at
// the event id the page was rendered at, so a change committed meanwhile is replayed, not missed.
// When a "model.change" event for this object arrives, a notice appears at the top of the form:
// "Changed by editor at 14:02 — your save would overwrite it: reload, or keep editing", with a
// link that opens the current version in a new tab. When PRESENCE_TOPICS announces the topic,
// a line above the form says who else has the object open, and since when ("Also here: editor
// since 15:58"), from the state rendered with the page and the presence.join / presence.leave
// events that follow it. Names and object texts are user data: they only ever go through textContent.
(() => {
  "use strict";
  const config = document.getElementById("realtime-change-form");
  if (!config) return;
  const page = JSON.parse(config.textContent);

  function clock(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return "";
    const options = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
    try {
      return date.toLocaleTimeString([], { ...options, timeZone: page.time_zone });
    } catch (error) {
      return date.toLocaleTimeString([], options); // an unknown zone name: the browser's own
    }
  }

  function link(text, href, newTab) {
    const a = document.createElement("a");
    a.textContent = text;
    a.href = href;
    if (newTab) {
      a.target = "_blank";
      a.rel = "noopener";
    }
    return a;
  }

  function notice() {
    let list = document.getElementById("realtime-conflict");
    if (list) return list.firstElementChild;
    const form = document.querySelector("#content-main form");
    if (!form) return null;
    list = document.createElement("ul");
    list.id = "realtime-conflict";
    list.className = "messagelist realtime-conflict";
    list.setAttribute("role", "alert");
    const item = document.createElement("li");
    item.className = "warning";
    list.append(item);
    const body = form.querySelector(":scope > div") || form;
    body.prepend(list);
    return item;
  }

  function show(data) {
    const item = notice();
    if (!item) return;
    const who = data.actor ? data.actor.username : null;
    const when = clock(data.at);
    const parts = [];
    const verb = data.action === "deleted" ? "Deleted" : "Changed";
    const by = document.createElement("strong");
    by.textContent = who || "someone";
    parts.push(`${verb} by `, by, when ? ` at ${when}` : "");
    if (data.action === "deleted") {
      parts.push(" — this object no longer exists: your changes cannot be saved.");
    } else {
      parts.push(
        " — your save would overwrite it: ",
        link("reload", page.url, false),
        ", or keep editing. ",
        link("Open the current version in a new tab", page.url, true),
        ".",
      );
    }
    item.replaceChildren(...parts);
    item.dataset.action = data.action;
  }

  const present = new Map((page.present || []).map((user) => [user.id, user]));

  function showPresent() {
    if (!page.presence) return;
    const form = document.querySelector("#content-main form");
    if (!form) return;
    let line = document.getElementById("realtime-present");
    if (!line) {
      line = document.createElement("p");
      line.id = "realtime-present";
      line.className = "help realtime-present";
      line.setAttribute("aria-live", "polite");
      form.before(line);
    }
    line.hidden = present.size === 0;
    const parts = ["Also here: "];
    [...present.values()].forEach((user, index) => {
      const name = document.createElement("strong");
      name.textContent = user.username;
      const when = clock(user.since);
      parts.push(index ? ", " : "", name, when ? ` since ${when}` : "");
    });
    line.replaceChildren(...parts);
  }

  function whenReady(action) {
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", action, { once: true });
    } else {
      action();
    }
  }

  whenReady(showPresent);
  document.addEventListener("realtime:event", ({ detail: message }) => {
    if (message.topic !== page.topic) return;
    if (message.event === "presence.join" || message.event === "presence.leave") {
      const user = (message.data || {}).user;
      if (!user || user.id === page.me) return;
      if (message.event === "presence.leave") present.delete(user.id);
      else if (!present.has(user.id)) present.set(user.id, { ...user, since: message.at });
      whenReady(showPresent);
      return;
    }
    if (message.event !== "model.change") return;
    const data = message.data || {};
    if (data.model !== page.model || String(data.pk) !== page.pk) return;
    whenReady(() => show(data));
  });
})();
