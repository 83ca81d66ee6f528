// Drives the PocketOS dashboard in headless Chromium as a person would:
// set the admin password, install a model from the catalog and watch its
// progress, run it, switch the power profile, upload a tampered pack and
// read the error. Prints what it saw as one JSON object on stdout; any
// step that does not happen fails the run.
//
// Environment:
//   DASHBOARD_URL   the page, e.g. http://localhost:8080
//   PASSWORD        the admin password to set (first boot) or log in with
//   SETUP_CODE      the box's setup code, for a first boot from another
//                   computer (the page then asks for it)
//   MODEL           the catalog model to install (default mlp)
//   SCENARIO        "full" (everything), "install" (log in, install, run) or
//                   "chat" (log in, install an LLM, chat: two turns, then Stop)
//   TAMPERED_PACK   a model pack file whose payload was altered (full)
//   SCREENSHOTS     a directory for screenshots of the main views (optional)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//   STEP_TIMEOUT_MS how long one step may take (default 60000)
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const env = process.env;
const url = env.DASHBOARD_URL;
const password = env.PASSWORD;
const model = env.MODEL || "mlp";
const scenario = env.SCENARIO || "full";
const shots = env.SCREENSHOTS;
const timeout = Number(env.STEP_TIMEOUT_MS || 60000);
if (!url || !password) throw new Error("DASHBOARD_URL and PASSWORD are required");

const seen = { console_errors: [], steps: {} };
const t0 = Date.now();
const mark = (step) => { seen.steps[step] = Date.now() - t0; };
const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Root in CI: Chromium's own sandbox needs an unprivileged user.
  args: ["--no-sandbox", "--disable-gpu"],
});
try {
  // Over HTTPS the box shows its own certificate, which no authority
  // signed: the browser takes it, and the caller compares the fingerprint
  // the page shows (seen.tls_fingerprint) with the one it trusts.
  const page = await browser.newPage({
    viewport: { width: 1280, height: 900 },
    ignoreHTTPSErrors: url.startsWith("https:"),
  });
  page.setDefaultTimeout(timeout);
  page.on("dialog", (d) => d.accept());
  page.on("console", (m) => { if (m.type() === "error") seen.console_errors.push(m.text()); });
  page.on("pageerror", (e) => seen.console_errors.push(String(e)));
  if (shots) mkdirSync(shots, { recursive: true });
  const shot = async (name, locator) => {
    if (!shots) return;
    await (locator || page).screenshot({ path: join(shots, `${name}.png`) });
  };

  mark("launched");
  await page.goto(url);
  // First boot: the page asks for the admin password; later, a login.
  const dialog = page.locator("#login");
  await dialog.waitFor({ state: "visible" }).catch(() => page.click("#login-button"));
  seen.login_title = await page.textContent("#login-title");
  await page.fill("#password", password);
  if (await page.isVisible("#password2")) await page.fill("#password2", password);
  seen.setup_code_asked = await page.isVisible("#setup-code");
  if (seen.setup_code_asked) {
    if (!env.SETUP_CODE) throw new Error("the page asks for a setup code and SETUP_CODE is not set");
    seen.login_hint = await page.textContent("#login-hint");
    await page.fill("#setup-code", env.SETUP_CODE);
  }
  await shot("login", dialog);
  await page.click("#login-submit");
  await page.waitForSelector("#logout-button", { state: "visible" });
  seen.who = await page.textContent("#who");
  seen.tls_fingerprint = await page.textContent("#tls-fingerprint");
  mark("logged_in");

  // The store: Install, then live progress until it is done.
  const row = page.locator(`#catalog tr[data-model="${model}"]`);
  await row.waitFor();
  seen.fits = await row.locator("td").nth(3).textContent();
  await shot("store");
  await row.locator("button.install").click();
  const progress = row.locator(".progress-text");
  await progress.waitFor();
  seen.progress = [];
  // Progress text while it runs (phase · bytes · speed · time left).
  for (let i = 0; i < 400 && (await progress.count()) > 0; i++) {
    const t = await progress.first().textContent({ timeout: 200 }).catch(() => null);
    if (t && seen.progress[seen.progress.length - 1] !== t) {
      seen.progress.push(t);
      if (seen.progress.length === 3) await shot("install-progress");
    }
    await page.waitForTimeout(50);
  }
  await page.waitForFunction(
    (m) => document.querySelector("#message")?.textContent.includes(`${m} is installed`), model);
  seen.install_message = await page.textContent("#message");
  mark("installed");
  seen.store_state = await row.locator("td").nth(4).textContent();

  const installed = page.locator(`#models tr[data-model="${model}"]`);
  if (scenario === "chat") {
    // One click from the installed model to a chat with it.
    await installed.locator("button.chat").click();
    await page.fill("#chat-temperature", "0");
    const turn = async (text, n) => {
      await page.fill("#chat-input", text);
      await page.click("#chat-send");
      await page.waitForFunction((i) => /tokens\/s/.test(
        document.querySelectorAll("#chat-log .turn.assistant .stats")[i]?.textContent || ""), n);
      const a = page.locator("#chat-log .turn.assistant").nth(n);
      return { answer: await a.locator(".answer").textContent(), stats: await a.locator(".stats").textContent() };
    };
    seen.chat = [await turn("What is 2+2?", 0)];
    mark("first_answer");
    seen.chat.push(await turn("And what is 3+3?", 1));
    await shot("chat", page.locator("#chat"));
    // Stop ends an answer in the middle.
    await page.fill("#chat-input", "Tell me a very long story about a dragon and a knight.");
    await page.click("#chat-send");
    await page.waitForFunction(() => (document.querySelectorAll("#chat-log .turn.assistant .answer")[2]?.textContent || "").length > 10);
    await page.click("#chat-stop");
    await page.waitForFunction(() => /stopped/.test(document.querySelectorAll("#chat-log .turn.assistant .stats")[2]?.textContent || ""));
    seen.chat_stopped = await page.locator("#chat-log .turn.assistant").nth(2).locator(".stats").textContent();
    seen.send_enabled = await page.isEnabled("#chat-send");
    mark("chatted");
  } else {
  // Installed: a test run shows the provider and latency.
  await installed.locator("button.run").click();
  await page.waitForSelector("#run-result .run-latency");
  seen.run_provider = await page.textContent("#run-result .run-provider");
  seen.run_latency = await page.textContent("#run-result .run-latency");
  await page.waitForFunction(
    (m) => document.querySelector(`#models tr[data-model="${m}"] .provider`)?.textContent !== "not loaded", model);
  seen.installed_provider = await installed.locator(".provider").textContent();
  await shot("installed", page.locator("#installed"));
  mark("ran");
  }

  if (scenario === "full") {
    // Power: switch the profile; the page shows the one now active.
    await page.click('#profiles button[data-profile="power-saver"]');
    await page.waitForSelector('#profiles button[data-profile="power-saver"][aria-pressed="true"]');
    seen.profile = "power-saver";
    await page.waitForFunction(() => /°C/.test(document.querySelector("#temps")?.textContent || ""));
    seen.temperatures = await page.textContent("#temps");
    seen.watts = await page.textContent("#watts");
    seen.budget = await page.textContent("#budget");
    await shot("power", page.locator("#power"));
    await shot("updates", page.locator("#updates"));

    // A tampered pack uploaded through the page is refused, and says why.
    await page.setInputFiles("#model-file", env.TAMPERED_PACK);
    await page.click('#upload-model button[type="submit"]');
    await page.waitForFunction(() => /failed/.test(document.querySelector("#message")?.textContent || ""));
    seen.tampered_message = await page.textContent("#message");
    mark("tampered_refused");
    // The overview: every section, the refusal in the banner.
    await shot("dashboard");
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
