// realtime.js: the browser client of the realtime app. A plain ES module, no build step.
//
//   import { RealtimeClient } from "/static/realtime/realtime.js";
//   const client = new RealtimeClient({ tokenUrl: "/realtime/token/", topics: ["room:1"] });
//   (option lastId: an event id the page was rendered at; the first connection replays what followed it)
//   client.on("event", (message) => console.log(message.event, message.data));
//   client.on("state", (state) => console.log(state));  // connecting | open | closed | stopped
//   client.on("reset", () => location.reload());         // the server could not replay what was missed
//   client.start();
//
// It fetches a short-lived token with the page's session, connects, authenticates with
// the first message, and dispatches events. After any disconnect it reconnects with
// exponential backoff and jitter and resumes from the last event id it saw, so events
// published meanwhile arrive exactly once and in order. Close code 4401 (logged out or
// revoked) stops it: a new token would be refused too.

const AUTH_FAILED = 4401;

export class RealtimeClient {
  constructor({ tokenUrl = "/realtime/token/", topics = [], minDelay = 500, maxDelay = 15000, lastId = null } = {}) {
    this.tokenUrl = tokenUrl;
    this.topics = new Set(topics);
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.lastId = lastId;
    this.state = "stopped";
    this.user = null;
    this._handlers = new Map();
    this._socket = null;
    this._attempt = 0;
    this._timer = null;
  }

  /** Register `handler` for "event", "state", "welcome", "reset", "error" or "message". */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this._handlers.get(type).delete(handler);
  }

  start() {
    if (this._running) return;
    this._running = true;
    this._stopped = false;
    this._connect();
  }

  stop() {
    this._running = false;
    this._stopped = true;
    clearTimeout(this._timer);
    if (this._socket) this._socket.close(1000, "client stopped");
    this._setState("stopped");
  }

  subscribe(topic) {
    this.topics.add(topic);
    this._send({ type: "subscribe", topic });
  }

  unsubscribe(topic) {
    this.topics.delete(topic);
    this._send({ type: "unsubscribe", topic });
  }

  _emit(type, value) {
    for (const handler of this._handlers.get(type) || []) {
      try {
        handler(value);
      } catch (error) {
        console.error("realtime: handler for", type, "failed:", error);
      }
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  _send(message) {
    if (this._socket && this._socket.readyState === WebSocket.OPEN && this._authenticated) {
      this._socket.send(JSON.stringify(message));
    }
  }

  async _connect() {
    this._setState("connecting");
    let grant;
    try {
      const response = await fetch(this.tokenUrl, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401 || response.status === 403) {
        this._emit("error", { code: "logged_out", message: "Not logged in." });
        this._running = false;
        this._setState("stopped");
        return;
      }
      if (!response.ok) throw new Error(`token endpoint answered ${response.status}`);
      grant = await response.json();
    } catch (error) {
      this._retry();
      return;
    }
    if (this._stopped) return;
    const socket = new WebSocket(grant.url);
    this._socket = socket;
    this._authenticated = false;
    socket.onopen = () => {
      socket.send(JSON.stringify({ type: "auth", token: grant.token, last_id: this.lastId, topics: [...this.topics] }));
    };
    socket.onmessage = (message) => this._onMessage(JSON.parse(message.data));
    socket.onclose = (event) => {
      if (this._socket !== socket) return;
      this._socket = null;
      this._authenticated = false;
      if (this._stopped) return;
      if (event.code === AUTH_FAILED) {
        this._emit("error", { code: "auth_failed", message: event.reason || "Authentication failed." });
        this._running = false;
        this._setState("stopped");
        return;
      }
      this._retry();
    };
  }

  _onMessage(message) {
    this._emit("message", message);
    switch (message.type) {
      case "welcome":
        this._authenticated = true;
        this._attempt = 0;
        this.user = message.user;
        if (this.lastId === null) this.lastId = message.last_id;
        this._setState("open");
        this._emit("welcome", message);
        break;
      case "event":
        // Ids are commit-ordered: anything at or below the last one is a duplicate.
        if (this.lastId !== null && message.id <= this.lastId) return;
        this.lastId = message.id;
        this._emit("event", message);
        break;
      case "reset":
        this.lastId = message.last_id;
        this._emit("reset", message);
        break;
      case "unsubscribed":
        // Also the answer to a topic the server refused in the auth message.
        this.topics.delete(message.topic);
        break;
      case "error":
        if (message.code === "forbidden" && message.topic) this.topics.delete(message.topic);
        this._emit("error", message);
        break;
    }
  }

  _retry() {
    this._setState("closed");
    if (this._stopped) return;
    // Exponential backoff, jittered between half and all of the delay, so a restarted
    // server is not stampeded by every page at once.
    const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this._attempt);
    this._attempt += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this._timer = setTimeout(() => this._connect(), delay);
  }
}
