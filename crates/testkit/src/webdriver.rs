//! A real headless Chromium driven over WebDriver (W3C), for tests that click through the web
//! console: Debian's `chromium` and `chromium-driver` packages (`/usr/bin/chromium`,
//! `/usr/bin/chromedriver`). A small client of the protocol's JSON over HTTP, only the commands
//! the tests use: open a page, find elements by CSS selector, click, type, run a script, take a
//! screenshot. Every wait has a deadline.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::wait::poll_until;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key under which WebDriver names an element.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long one WebDriver command may take (a loaded machine starts Chromium slowly).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the browser tests cannot run here, if they cannot: the packages are missing.
pub fn missing() -> Option<String> {
    [CHROMIUM, CHROMEDRIVER]
        .iter()
        .find(|path| !Path::new(path).exists())
        .map(|path| format!("{path} is missing (apt-get install chromium chromium-driver)"))
}

/// One Chromium session behind its own chromedriver. Dropping it ends both.
pub struct Browser {
    driver: Child,
    http: reqwest::Client,
    session_url: String,
    _profile: tempfile::TempDir,
}

/// An element found on the page (a WebDriver element reference).
#[derive(Clone, Debug)]
pub struct Element(String);

/// A WebDriver error answer: `error` is the protocol's code (`no such element`, `stale element
/// reference`, …).
#[derive(Debug)]
pub struct DriverError {
    pub error: String,
    pub message: String,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium with a window of
    /// `width` × `height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> Browser {
        let port = crate::free_port();
        let profile =
            tempfile::Builder::new().prefix("outpost-chromium-").tempdir().expect("a profile directory");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::builder().timeout(COMMAND_TIMEOUT).build().expect("an HTTP client");
        let base = format!("http://127.0.0.1:{port}");
        let ready = poll_until(Duration::from_secs(30), || {
            let http = http.clone();
            let url = format!("{base}/status");
            async move {
                let reply = http.get(url).send().await.ok()?.json::<Value>().await.ok()?;
                (reply["value"]["ready"] == true).then_some(())
            }
        })
        .await;
        let mut browser = Browser { driver, http, session_url: String::new(), _profile: profile };
        assert!(ready.is_some(), "chromedriver did not become ready within 30 s");
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--no-first-run".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--hide-scrollbars".to_string(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let reply =
            browser.command(reqwest::Method::POST, &format!("{base}/session"), Some(capabilities)).await;
        let session =
            reply.expect("a Chromium session")["sessionId"].as_str().expect("a session id").to_string();
        browser.session_url = format!("{base}/session/{session}");
        browser.set_viewport(width, height).await;
        browser
    }

    async fn command(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
    ) -> Result<Value, DriverError> {
        let mut request = self.http.request(method.clone(), url);
        if let Some(body) = body {
            request = request.json(&body);
        } else if method == reqwest::Method::POST {
            request = request.json(&json!({}));
        }
        let reply = request
            .send()
            .await
            .map_err(|e| DriverError { error: "transport".into(), message: e.to_string() })?;
        let ok = reply.status().is_success();
        let value: Value = reply
            .json()
            .await
            .map_err(|e| DriverError { error: "transport".into(), message: format!("not JSON: {e}") })?;
        let value = value.get("value").cloned().unwrap_or(Value::Null);
        if ok {
            Ok(value)
        } else {
            Err(DriverError {
                error: value["error"].as_str().unwrap_or("unknown error").to_string(),
                message: value["message"].as_str().unwrap_or_default().to_string(),
            })
        }
    }

    async fn session(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DriverError> {
        self.command(method, &format!("{}{path}", self.session_url), body).await
    }

    /// Makes the page's viewport exactly `width` × `height` (the window is a little larger).
    pub async fn set_viewport(&self, width: u32, height: u32) {
        for _ in 0..3 {
            let inner = self.execute("return [window.innerWidth, window.innerHeight]", json!([])).await;
            let (w, h) = (inner[0].as_i64().unwrap_or(0), inner[1].as_i64().unwrap_or(0));
            if (w, h) == (i64::from(width), i64::from(height)) {
                return;
            }
            let rect = self.session(reqwest::Method::GET, "/window/rect", None).await.expect("window rect");
            let (ow, oh) = (rect["width"].as_i64().unwrap_or(0), rect["height"].as_i64().unwrap_or(0));
            let body = json!({"width": ow + i64::from(width) - w, "height": oh + i64::from(height) - h});
            self.session(reqwest::Method::POST, "/window/rect", Some(body))
                .await
                .expect("set the window rect");
        }
    }

    pub async fn goto(&self, url: &str) {
        self.session(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .expect("open the page");
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its value.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.session(reqwest::Method::POST, "/execute/sync", Some(json!({"script": script, "args": args})))
            .await
            .unwrap_or_else(|e| panic!("script failed: {e:?}\n{script}"))
    }

    /// The element matching `css` now, if any.
    pub async fn find(&self, css: &str) -> Option<Element> {
        let body = json!({"using": "css selector", "value": css});
        match self.session(reqwest::Method::POST, "/element", Some(body)).await {
            Ok(value) => value[ELEMENT_KEY].as_str().map(|id| Element(id.to_string())),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("find {css:?}: {e:?}"),
        }
    }

    async fn element_flag(&self, element: &Element, flag: &str) -> Result<bool, DriverError> {
        Ok(self.session(reqwest::Method::GET, &format!("/element/{}/{flag}", element.0), None).await? == true)
    }

    /// Waits until an element matching `css` is shown and enabled.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        poll_until(timeout, || async {
            let element = self.find(css).await?;
            let shown = self.element_flag(&element, "displayed").await.ok()?;
            let enabled = self.element_flag(&element, "enabled").await.ok()?;
            (shown && enabled).then_some(element)
        })
        .await
        .unwrap_or_else(|| panic!("no shown and enabled element {css:?} within {timeout:?}"))
    }

    /// Clicks the element matching `css` once it is shown and enabled, finding it again if the
    /// page replaced it meanwhile (the console re-renders rows whose data changed).
    pub async fn click(&self, css: &str) {
        let timeout = Duration::from_secs(20);
        let clicked = poll_until(timeout, || async {
            let element = self.wait_for(css, timeout).await;
            match self.session(reqwest::Method::POST, &format!("/element/{}/click", element.0), None).await {
                Ok(_) => Some(()),
                Err(e) if e.error == "stale element reference" || e.error == "element click intercepted" => {
                    None
                }
                Err(e) => panic!("click {css:?}: {e:?}"),
            }
        })
        .await;
        assert!(clicked.is_some(), "could not click {css:?} within {timeout:?}");
    }

    /// Replaces the value of the input matching `css` with `text`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.wait_for(css, Duration::from_secs(20)).await;
        self.session(reqwest::Method::POST, &format!("/element/{}/clear", element.0), None)
            .await
            .unwrap_or_else(|e| panic!("clear {css:?}: {e:?}"));
        self.session(
            reqwest::Method::POST,
            &format!("/element/{}/value", element.0),
            Some(json!({ "text": text })),
        )
        .await
        .unwrap_or_else(|e| panic!("type into {css:?}: {e:?}"));
    }

    /// The rendered text of the element matching `css` ("" when there is none).
    pub async fn text(&self, css: &str) -> String {
        let script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';";
        self.execute(script, json!([css])).await.as_str().unwrap_or_default().to_string()
    }

    /// Waits until the text of the element matching `css` contains `expected`.
    pub async fn wait_text(&self, css: &str, expected: &str, timeout: Duration) -> String {
        poll_until(timeout, || async {
            let text = self.text(css).await;
            text.contains(expected).then_some(text)
        })
        .await
        .unwrap_or_else(|| panic!("{css:?} did not show {expected:?} within {timeout:?}"))
    }

    /// A PNG of the whole page at the current viewport width, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let size = self
            .execute(
                "return [window.innerWidth, window.innerHeight, document.documentElement.scrollHeight]",
                json!([]),
            )
            .await;
        let (width, height, full) = (
            size[0].as_u64().unwrap_or(800),
            size[1].as_u64().unwrap_or(600),
            size[2].as_u64().unwrap_or(600),
        );
        let tall = full.clamp(height, 6000) as u32;
        if u64::from(tall) != height {
            self.set_viewport(width as u32, tall).await;
        }
        let png = self.session(reqwest::Method::GET, "/screenshot", None).await.expect("a screenshot");
        if u64::from(tall) != height {
            self.set_viewport(width as u32, height as u32).await;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 PNG"))
            .expect("PNG bytes");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the screenshot directory");
        }
        std::fs::write(path, bytes).expect("write the screenshot");
    }
}

impl Browser {
    /// Ends the session (chromedriver stops Chromium), then chromedriver.
    pub async fn close(mut self) {
        let url = std::mem::take(&mut self.session_url);
        if !url.is_empty() {
            let _ = self.command(reqwest::Method::DELETE, &url, None).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver runs in its own process group with the Chromium it started: end them all,
        // also when a test panicked before `close`.
        let group = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}
