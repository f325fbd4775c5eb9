// admin-live.js: the live admin pages. No dependencies, no build step.
//
// realtime/admin_toasts.html loads it with the page's state in
// <script id="realtime-admin-page" type="application/json"> (see realtime.live_admin.page_state);
// `kind` says which page this is. The page's client (window.realtimeAdmin) starts at the event id
// the page was rendered at, so what is committed meanwhile is replayed, not missed.
//
// - "form", a change form: when a "model.change" event for this object arrives, a notice appears
//   at the top of the form: "Changed by editor at 14:02 — your save would overwrite it: reload, or
//   keep editing", with a link that opens the current version in a new tab.
// - "list", a change list: rows changed by others since the page loaded are highlighted, deleted
//   ones struck out, added ones counted, and a banner says "3 changes since you opened this page —
//   refresh" (a link to the same list, filters, search and ordering included). Nothing else on
//   the page changes: the selection stays.
// - "form" and "list": when PRESENCE_TOPICS announces the topic, a line says who else has the
//   same object or list open, and since when ("Also here: editor since 15:58"), from the state
//   rendered with the page and the presence.join / presence.leave events that follow it.
// - "index": others' admin actions ("admin.logentry" events, which only those who may view the
//   model receive) appear at the top of "Recent actions"; the user's own, from another tab, at the
//   top of "My actions".
// - "history": the object's new log entries are added to its history table.
//
// - "delete", a delete confirmation page: the form carries the event id the page was rendered at
//   (a delete confirmed before someone else's change is asked again), and a notice says who
//   changed the object meanwhile.
// - every kind: on a "reset" (what the page missed can no longer be replayed), a notice asks for a
//   reload.
//
// Your own changes (actor == you) are not news and do not count. Names, object texts and change
// messages are user data: they only ever go through textContent.
(() => {
  "use strict";
  const config = document.getElementById("realtime-admin-page");
  if (!config) return;
  const page = JSON.parse(config.textContent);

  // --- Shared helpers ------------------------------------------------------------------------

  function clock(iso, options = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" }) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return "";
    try {
      return date.toLocaleString([], { ...options, timeZone: page.time_zone });
    } catch (error) {
      return date.toLocaleString([], options); // an unknown zone name: the browser's own
    }
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function link(text, href, newTab) {
    const a = element("a", text);
    a.href = href;
    if (newTab) {
      a.target = "_blank";
      a.rel = "noopener";
    }
    return a;
  }

  // Only the site's own paths become links ("/admin/...", never "//host" or "javascript:").
  function sitePath(url) {
    return typeof url === "string" && /^\/(?!\/)/.test(url) ? url : null;
  }

  // A message in the admin's own style (ul.messagelist li.warning: its colours, dark mode included),
  // made once and put in place by `place(list)`; returns its item, or null if there is no place yet.
  function notice(id, role, place) {
    let list = document.getElementById(id);
    if (list) return list.firstElementChild;
    list = element("ul", undefined, `messagelist ${id}`);
    list.id = id;
    list.setAttribute("role", role);
    list.append(element("li", undefined, "warning"));
    return place(list) === false ? null : list.firstElementChild;
  }

  function whenReady(action) {
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", action, { once: true });
    } else {
      action();
    }
  }

  function fromOthers(data) {
    return !(data.actor && data.actor.id === page.me);
  }

  const handlers = [];
  document.addEventListener("realtime:event", ({ detail: message }) => {
    for (const handler of handlers) whenReady(() => handler(message));
  });

  // --- Who else is here (change form and change list) ------------------------------------------

  function presence(anchorOf) {
    if (!page.presence) return;
    const present = new Map((page.present || []).map((user) => [user.id, user]));
    function show() {
      const anchor = anchorOf();
      if (!anchor) return;
      let line = document.getElementById("realtime-present");
      if (!line) {
        line = element("p", undefined, "help realtime-present");
        line.id = "realtime-present";
        line.setAttribute("aria-live", "polite");
        anchor.before(line);
      }
      line.hidden = present.size === 0;
      const parts = ["Also here: "];
      [...present.values()].forEach((user, index) => {
        const when = clock(user.since);
        parts.push(index ? ", " : "", element("strong", user.username), when ? ` since ${when}` : "");
      });
      line.replaceChildren(...parts);
    }
    whenReady(show);
    handlers.push((message) => {
      if (message.topic !== page.topic) return;
      if (message.event !== "presence.join" && message.event !== "presence.leave") return;
      const user = (message.data || {}).user;
      if (!user || user.id === page.me) return;
      if (message.event === "presence.leave") present.delete(user.id);
      else if (!present.has(user.id)) present.set(user.id, { ...user, since: message.at });
      show();
    });
  }

  // --- Change form: a notice when someone else saves or deletes the object ---------------------

  function changeForm() {
    const form = () => document.querySelector("#content-main form");
    presence(form);
    handlers.push((message) => {
      if (message.event !== "model.change" || message.topic !== page.topic) return;
      const data = message.data || {};
      if (data.model !== page.model || String(data.pk) !== page.pk) return;
      const item = notice("realtime-conflict", "alert", (list) => {
        const body = form() && (form().querySelector(":scope > div") || form());
        if (!body) return false;
        body.prepend(list);
      });
      if (!item) return;
      const when = clock(data.at);
      const verb = data.action === "deleted" ? "Deleted" : "Changed";
      const parts = [`${verb} by `, element("strong", data.actor ? data.actor.username : "someone"), when ? ` at ${when}` : ""];
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
    });
  }

  // --- Delete page: the page's version, and a notice when someone else changes the object ----------

  function deletePage() {
    const form = () => document.querySelector("#content form input[name=post]")?.form || null;
    whenReady(() => {
      const target = form();
      if (!target || target.querySelector("input[name=_realtime_seen]")) return;
      // Compared on submit: a delete confirmed before someone else's change is asked again.
      const seen = element("input");
      seen.type = "hidden";
      seen.name = "_realtime_seen";
      seen.value = page.seen;
      target.append(seen);
    });
    handlers.push((message) => {
      if (message.event !== "model.change" || message.topic !== page.topic) return;
      const data = message.data || {};
      if (data.model !== page.model || String(data.pk) !== page.pk) return;
      const item = notice("realtime-conflict", "alert", (list) => (form() ? form().before(list) : false));
      if (!item) return;
      const when = clock(data.at);
      const deleted = data.action === "deleted";
      item.replaceChildren(
        `${deleted ? "Deleted" : "Changed"} by `,
        element("strong", data.actor ? data.actor.username : "someone"),
        when ? ` at ${when}` : "",
        ...(deleted ? [" — it is already gone."] : [" — check what you are deleting: ", link("reload", page.url, false), "."]),
      );
      item.dataset.action = data.action;
    });
  }

  // --- Change list: mark rows, count changes, offer a refresh -----------------------------------

  // Django's admin quote(): how a primary key appears in an admin URL.
  function adminQuote(text) {
    return text.replace(/[:/_#?;@&=+$,"[\]<>%\n\\]/g, (c) => "_" + c.charCodeAt(0).toString(16).toUpperCase().padStart(2, "0"));
  }

  function changeList() {
    const list = () => document.getElementById("changelist");
    presence(list);
    let count = 0;

    function row(pk) {
      for (const box of document.querySelectorAll("#result_list input.action-select")) {
        if (box.value === pk) return box.closest("tr");
      }
      // No action checkboxes (actions = None): the row's link to the object's change form.
      const path = new URL(page.change_url.replace("realtimepk0", adminQuote(pk)), location.href).pathname;
      for (const a of document.querySelectorAll("#result_list tbody a[href]")) {
        if (new URL(a.href).pathname === path) return a.closest("tr");
      }
      return null;
    }

    handlers.push((message) => {
      if (message.event !== "model.change" || message.topic !== page.topic) return;
      const data = message.data || {};
      if (data.model !== page.model || !fromOthers(data)) return;
      const tr = row(String(data.pk));
      if (tr) {
        const who = data.actor ? data.actor.username : "someone";
        const when = clock(data.at);
        const deleted = data.action === "deleted";
        tr.classList.add(deleted ? "realtime-deleted" : "realtime-changed");
        if (deleted) tr.classList.remove("realtime-changed");
        const what = `${deleted ? "Deleted" : "Changed"} by ${who}${when ? ` at ${when}` : ""}`;
        tr.title = what;
        tr.dataset.realtimeAction = data.action;
        // Said in words too: the highlight alone looks like a selected row, and says nothing to a screen reader.
        let mark = tr.querySelector(".realtime-mark");
        if (!mark) {
          mark = element("span", undefined, "realtime-mark");
          (tr.querySelector("th") || tr.cells[tr.cells.length - 1]).append(" ", mark);
        }
        mark.textContent = `${deleted ? "deleted" : "changed"} by ${who}`;
        if (when) mark.textContent += ` at ${when}`;
      }
      count += 1;
      const item = notice("realtime-list-changes", "status", (ul) => (list() ? list().before(ul) : false));
      if (!item) return;
      const refresh = link("refresh", location.pathname + location.search, false);
      item.replaceChildren(`${count} change${count === 1 ? "" : "s"} since you opened this page — `, refresh);
      item.dataset.count = String(count);
    });
  }

  // --- Index: Recent actions -----------------------------------------------------------------------

  const LINK_CLASS = { addition: "addlink", change: "changelink", deletion: "deletelink" };
  const HIDDEN_VERB = { addition: "Added:", change: "Changed:", deletion: "Deleted:" };
  const MAX_ITEMS = 10;

  function actionItem(data, others) {
    const item = element("li", undefined, LINK_CLASS[data.action] || "");
    item.append(element("span", HIDDEN_VERB[data.action] || "", "visually-hidden"), " ");
    const href = data.action === "deletion" ? null : sitePath(data.admin_url);
    item.append(href ? link(data.object_repr, href, false) : data.object_repr, element("br"));
    let detail = page.models[data.content_type] || data.content_type || "Unknown content";
    if (others) {
      const when = clock(data.action_time);
      detail += ` · ${data.actor.username}${when ? ` at ${when}` : ""}`;
    }
    item.append(element("span", detail, "mini quiet"));
    return item;
  }

  function prependTo(listOf, item) {
    const list = listOf();
    list.prepend(item);
    while (list.children.length > MAX_ITEMS) list.lastElementChild.remove();
  }

  function index() {
    const module = () => document.getElementById("recent-actions-module");
    function othersList() {
      let list = document.getElementById("realtime-recent-others");
      if (list) return list;
      const heading = element("h3", "By others, since you opened this page");
      list = element("ul", undefined, "actionlist");
      list.id = "realtime-recent-others";
      list.setAttribute("aria-live", "polite");
      module().querySelector("h2").after(heading, list);
      return list;
    }
    function myList() {
      let list = module().querySelector("ul.actionlist:not(#realtime-recent-others)");
      if (list) return list;
      list = element("ul", undefined, "actionlist");
      const none = module().querySelector(":scope > p"); // "None available" until now
      if (none) none.replaceWith(list);
      else module().append(list);
      return list;
    }
    handlers.push((message) => {
      if (message.event !== "admin.logentry" || !module()) return;
      const data = message.data || {};
      if (!data.actor || !Object.hasOwn(page.models, data.content_type)) return;
      const others = fromOthers(data);
      prependTo(others ? othersList : myList, actionItem(data, others));
    });
  }

  // --- History: the object's new log entries ---------------------------------------------------------

  function history() {
    function tbody() {
      const module = document.getElementById("change-history");
      if (!module) return null;
      let body = module.querySelector("table tbody");
      if (body) return body;
      // "This object doesn't have a change history": the table Django would have rendered.
      const table = element("table");
      const head = element("tr");
      for (const title of ["Date/time", "User", "Action"]) {
        const th = element("th", title);
        th.scope = "col";
        head.append(th);
      }
      table.append(element("thead"), (body = element("tbody")));
      table.tHead.append(head);
      const empty = module.querySelector("p");
      if (empty) empty.replaceWith(table);
      else module.append(table);
      return body;
    }
    handlers.push((message) => {
      if (message.event !== "admin.logentry") return;
      const data = message.data || {};
      if (data.content_type !== page.model || data.object_id !== page.pk || !data.actor) return;
      const body = tbody();
      if (!body) return;
      const tr = element("tr", undefined, "realtime-new");
      const when = element("th", clock(data.action_time, { dateStyle: "medium", timeStyle: "short" }));
      when.scope = "row";
      tr.append(when, element("td", data.actor.username), element("td", data.change_message || ""));
      body.append(tr); // Django lists the history oldest first
    });
  }

  // --- Every kind: a reset ----------------------------------------------------------------------------

  // The server could not replay what this page missed (it was opened longer ago than RETENTION, or
  // the database is not the one it was rendered from): the page can no longer tell what changed.
  const RESET_TEXT = {
    form: "This page was opened too long ago to tell whether others changed this object since: ",
    list: "This list was opened too long ago to tell what others changed since: ",
    index: "This page was opened too long ago to show every action since: ",
    history: "This page was opened too long ago to show every change since: ",
    delete: "This page was opened too long ago to tell whether others changed this object since: ",
  };

  document.addEventListener("realtime:reset", () => {
    whenReady(() => {
      const item = notice("realtime-reset", "alert", (list) => {
        const content = document.getElementById("content");
        if (!content) return false;
        content.prepend(list);
      });
      if (!item) return;
      item.replaceChildren(RESET_TEXT[page.kind] || "", link("reload", location.pathname + location.search, false), ".");
      item.dataset.reset = "yes";
    });
  });

  ({ form: changeForm, list: changeList, index, history, delete: deletePage })[page.kind]?.();
})();
