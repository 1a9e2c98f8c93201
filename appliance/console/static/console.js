// Qwen appliance console. Everything the model says is written with textContent, never as HTML.
// The token lives only in sessionStorage (this tab); the conversation only in memory.
"use strict";

(() => {
  const TOKEN_KEY = "qwen-appliance.token";
  const LANG_KEY = "qwen-appliance.lang";
  const MAX_IMAGE_BYTES = 10 * 1000 * 1000;
  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];

  const TEXT = {
    en: {
      title: "Document assistant",
      switchLang: "中文",
      switchLabel: "切换到中文",
      forget: "Forget token",
      loginTitle: "Sign in with your access token",
      loginHint: "Your administrator gave you a token with your certificate. It is kept only in this " +
        "browser tab and forgotten when the tab closes.",
      tokenLabel: "Access token",
      tokenSave: "Continue",
      tokenEmpty: "Paste the token first.",
      empty: "Attach an image of a statement, contract or report and ask a question about it, or just ask.",
      dropHint: "Drop an image here (PNG, JPEG or WebP), or",
      choose: "choose a file",
      removeImage: "Remove",
      questionLabel: "Question",
      questionPlaceholder: "Ask a question (Ctrl+Enter to send)",
      ask: "Ask",
      stop: "Stop",
      clear: "Clear conversation",
      you: "You",
      assistant: "Assistant",
      footer: "Answers are generated on this appliance. Nothing you send is kept on it; the conversation " +
        "lives only in this tab.",
      thinking: "Waiting for the appliance…",
      streaming: "Answering…",
      done: "Done.",
      stopped: "Stopped.",
      cutOff: "The answer reached its length limit.",
      noQuestion: "Type a question first.",
      pdf: "PDF files cannot be read here: export the page as a PNG image and attach that.",
      badType: "Only PNG, JPEG and WebP images can be attached.",
      tooBig: "This image is larger than 10 MB: crop it or export it at a lower resolution.",
      unreadable: "This file could not be read.",
      network: "The appliance cannot be reached. Check the network and your certificate, then try again.",
      e401: "Your token was not accepted. Enter it again, or ask the administrator for a new one.",
      e403: "This client is not allowed to do this. Ask the administrator to check your access.",
      e413: "The image or question is too large for this appliance. Use a smaller image.",
      e415: "This image format is not accepted. Use PNG, JPEG or WebP.",
      e429: "Too many requests. Try again in {s} s.",
      e503: "The appliance is busy. Try again in {s} s.",
      e4xx: "The request was refused.",
      e5xx: "The appliance had a problem. Quote request ID {id} to the administrator.",
      cleared: "Conversation cleared.",
    },
    zh: {
      title: "文档助手",
      switchLang: "English",
      switchLabel: "Switch to English",
      forget: "清除令牌",
      loginTitle: "使用访问令牌登录",
      loginHint: "管理员已随证书发给您一个令牌。令牌只保存在当前浏览器标签页中，关闭标签页后即被清除。",
      tokenLabel: "访问令牌",
      tokenSave: "继续",
      tokenEmpty: "请先粘贴令牌。",
      empty: "可附上一张报表、合同或报告的图片并就其提问，也可以直接提问。",
      dropHint: "将图片拖放到这里（PNG、JPEG 或 WebP），或",
      choose: "选择文件",
      removeImage: "移除",
      questionLabel: "问题",
      questionPlaceholder: "请输入问题（Ctrl+Enter 发送）",
      ask: "提问",
      stop: "停止",
      clear: "清空对话",
      you: "您",
      assistant: "助手",
      footer: "回答在本设备上生成。您发送的内容不会保存在设备上；对话只存在于当前标签页。",
      thinking: "正在等待设备……",
      streaming: "正在回答……",
      done: "完成。",
      stopped: "已停止。",
      cutOff: "回答已达到长度上限。",
      noQuestion: "请先输入问题。",
      pdf: "此处无法读取 PDF 文件：请将该页导出为 PNG 图片后再附上。",
      badType: "只能附加 PNG、JPEG 和 WebP 图片。",
      tooBig: "图片超过 10 MB：请裁剪或以较低分辨率导出。",
      unreadable: "无法读取此文件。",
      network: "无法连接设备。请检查网络和证书后重试。",
      e401: "令牌未被接受。请重新输入，或向管理员申请新令牌。",
      e403: "此客户端无权执行该操作。请联系管理员检查您的权限。",
      e413: "图片或问题超出本设备的限制。请使用较小的图片。",
      e415: "不接受此图片格式。请使用 PNG、JPEG 或 WebP。",
      e429: "请求过于频繁。请在 {s} 秒后重试。",
      e503: "设备繁忙。请在 {s} 秒后重试。",
      e4xx: "请求被拒绝。",
      e5xx: "设备出现问题。请将请求编号 {id} 告知管理员。",
      cleared: "对话已清空。",
    },
  };

  const $ = (id) => document.getElementById(id);
  const state = {
    lang: "en",
    history: [],      // OpenAI-style messages, in memory only
    image: null,      // {dataUrl, blobUrl, name}
    controller: null, // AbortController of the running request
    blobUrls: [],
  };

  function t(key, vars) {
    let s = (TEXT[state.lang] && TEXT[state.lang][key]) || TEXT.en[key] || key;
    for (const [k, v] of Object.entries(vars || {})) s = s.replace(`{${k}}`, String(v));
    return s;
  }

  function applyLanguage(lang) {
    state.lang = lang === "zh" ? "zh" : "en";
    document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
    document.title = t("title");
    for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
      el.placeholder = t(el.dataset.i18nPlaceholder);
    }
    for (const el of document.querySelectorAll("[data-i18n-label]")) {
      el.setAttribute("aria-label", t(el.dataset.i18nLabel));
    }
    try { sessionStorage.setItem(LANG_KEY, state.lang); } catch (_) { /* storage may be disabled */ }
  }

  function initialLanguage() {
    let saved = null;
    try { saved = sessionStorage.getItem(LANG_KEY); } catch (_) { /* ignore */ }
    if (saved) return saved;
    return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
  }

  // --- token ------------------------------------------------------------------------------------

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (_) { return null; }
  }

  function showLogin(message) {
    $("login").hidden = false;
    $("chat").hidden = true;
    $("forget").hidden = true;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function showChat() {
    $("login").hidden = true;
    $("chat").hidden = false;
    $("forget").hidden = false;
    $("question").focus();
  }

  function saveToken() {
    const value = $("token").value.trim();
    if (!value) {
      $("login-error").textContent = t("tokenEmpty");
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    showChat();
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("");
  }

  // --- image ------------------------------------------------------------------------------------

  function setStatus(message, isError) {
    const el = $("status");
    el.textContent = message || "";
    el.classList.toggle("error", Boolean(isError));
  }

  function clearImage() {
    state.image = null;
    $("preview").hidden = true;
    $("preview").removeAttribute("src");
    $("file-name").textContent = "";
    $("remove-image").hidden = true;
    $("file").value = "";
  }

  function checkImage(file) {
    const name = (file.name || "").toLowerCase();
    if (file.type === "application/pdf" || name.endsWith(".pdf")) return "pdf";
    if (!IMAGE_TYPES.includes(file.type)) return "badType";
    if (file.size > MAX_IMAGE_BYTES) return "tooBig";
    return null;
  }

  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function takeImage(file) {
    const problem = checkImage(file);
    if (problem) {
      clearImage();
      setStatus(t(problem), true);
      return;
    }
    let dataUrl;
    try {
      dataUrl = await readDataUrl(file);
    } catch (_) {
      setStatus(t("unreadable"), true);
      return;
    }
    const blobUrl = URL.createObjectURL(file);
    state.blobUrls.push(blobUrl);
    state.image = { dataUrl, blobUrl, name: file.name };
    $("preview").src = blobUrl;
    $("preview").hidden = false;
    $("file-name").textContent = file.name;
    $("remove-image").hidden = false;
    setStatus("", false);
  }

  // --- conversation -----------------------------------------------------------------------------

  function addTurn(role, text, imageUrl) {
    const li = document.createElement("li");
    li.className = `turn ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.dataset.i18n = role === "user" ? "you" : "assistant";
    who.textContent = t(who.dataset.i18n);
    li.append(who);
    if (imageUrl) {
      const img = document.createElement("img");
      img.src = imageUrl;
      img.alt = "";
      li.append(img);
    }
    const p = document.createElement("p");
    p.className = role === "user" ? "text" : "text answer";
    p.textContent = text;
    li.append(p);
    $("conversation").append(li);
    $("empty").hidden = true;
    return p;
  }

  function clearConversation() {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("conversation").replaceChildren();
    for (const url of state.blobUrls) URL.revokeObjectURL(url);
    state.blobUrls = [];
    clearImage();
    $("empty").hidden = false;
    setStatus(t("cleared"), false);
  }

  function busy(on) {
    $("ask").disabled = on;
    $("stop").hidden = !on;
    $("question").disabled = on;
  }

  async function refusal(resp) {
    let message = "";
    try {
      const body = await resp.json();
      message = (body && body.error && body.error.message) || "";
    } catch (_) { /* not JSON */ }
    const retry = resp.headers.get("retry-after") || "?";
    const id = resp.headers.get("x-request-id") || "-";
    const known = { 401: "e401", 403: "e403", 413: "e413", 415: "e415", 429: "e429", 503: "e503" };
    const key = known[resp.status] || (resp.status >= 500 ? "e5xx" : "e4xx");
    const hint = t(key, { s: retry, id });
    return message ? `${hint} (${resp.status}: ${message})` : `${hint} (${resp.status})`;
  }

  // Reads Server-Sent Events and appends each delta as plain text; returns the finish reason.
  async function readStream(resp, answer) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let text = "";
    let chunks = 0;
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const choice = (JSON.parse(data).choices || [])[0] || {};
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            text += piece;
            chunks += 1;
            answer.textContent = text;
            answer.dataset.chunks = String(chunks);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    return { text, finish };
  }

  function userMessage(question, image) {
    if (!image) return { role: "user", content: question };
    return {
      role: "user",
      content: [
        { type: "image_url", image_url: { url: image.dataUrl } },
        { type: "text", text: question },
      ],
    };
  }

  async function ask() {
    const question = $("question").value.trim();
    if (!question) {
      setStatus(t("noQuestion"), true);
      return;
    }
    const auth = token();
    if (!auth) {
      showLogin("");
      return;
    }
    const image = state.image;
    const message = userMessage(question, image);
    addTurn("user", question, image && image.blobUrl);
    const answer = addTurn("assistant", "");
    answer.dataset.state = "waiting";
    answer.dataset.chunks = "0";
    $("question").value = "";
    clearImage();
    busy(true);
    setStatus(t("thinking"), false);
    state.controller = new AbortController();
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${auth}` },
        body: JSON.stringify({ messages: [...state.history, message], stream: true }),
        signal: state.controller.signal,
        credentials: "same-origin",
        cache: "no-store",
        referrerPolicy: "no-referrer",
      });
      if (!resp.ok) {
        const why = await refusal(resp);
        answer.dataset.state = "error";
        answer.textContent = why;
        answer.classList.add("error");
        setStatus("", false);
        if (resp.status === 401) {
          sessionStorage.removeItem(TOKEN_KEY);
          showLogin(why);
        }
        return;
      }
      answer.dataset.state = "streaming";
      setStatus(t("streaming"), false);
      const { text, finish } = await readStream(resp, answer);
      answer.dataset.state = "done";
      state.history.push(message, { role: "assistant", content: text });
      setStatus(finish === "length" ? t("cutOff") : t("done"), false);
    } catch (err) {
      const aborted = err && err.name === "AbortError";
      answer.dataset.state = aborted ? "stopped" : "error";
      setStatus(aborted ? t("stopped") : t("network"), !aborted);
    } finally {
      state.controller = null;
      busy(false);
      $("question").focus();
    }
  }

  // --- wiring -----------------------------------------------------------------------------------

  function wireDrop() {
    const drop = $("drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, () => drop.classList.remove("over"));
    }
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const file = ev.dataTransfer && ev.dataTransfer.files[0];
      if (file) takeImage(file);
    });
    drop.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("file").click(); }
    });
    $("file").addEventListener("change", () => {
      const file = $("file").files[0];
      if (file) takeImage(file);
    });
  }

  function start() {
    applyLanguage(initialLanguage());
    $("lang").addEventListener("click", () => applyLanguage(state.lang === "en" ? "zh" : "en"));
    $("forget").addEventListener("click", forgetToken);
    $("save-token").addEventListener("click", saveToken);
    $("token").addEventListener("keydown", (ev) => { if (ev.key === "Enter") saveToken(); });
    $("ask").addEventListener("click", ask);
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("clear").addEventListener("click", clearConversation);
    $("remove-image").addEventListener("click", clearImage);
    $("question").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) ask();
    });
    wireDrop();
    // Keep drops outside the drop zone from navigating away and losing the conversation.
    window.addEventListener("dragover", (ev) => ev.preventDefault());
    window.addEventListener("drop", (ev) => ev.preventDefault());
    if (token()) showChat(); else showLogin("");
  }

  start();
})();
