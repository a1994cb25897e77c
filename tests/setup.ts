// Preloaded by bunfig.toml for every test file: tests that train or prepare real images take
// seconds, and Bun's default limit is 5 s per test.
import { setDefaultTimeout } from "bun:test";

setDefaultTimeout(180_000);
