import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { parquetWriteBuffer } from "hyparquet-writer";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import sharp from "sharp";
import {
  downloadCifar100,
  downloadHfDataset,
  linkReport,
  listImageFolder,
  loadCifar100,
  classNamesFromReadme,
  mapWasteLabel,
  parseCifar100Bin,
  WASTE_CLASSES,
} from "../lib/sources.ts";

// ---------------------------------------------------------------------------
// fixtures
// ---------------------------------------------------------------------------

let work = "";
beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), "sources-test-"));
});
afterAll(() => {
  rmSync(work, { recursive: true, force: true });
});

function jpeg(r: number, g: number, b: number): Promise<Buffer> {
  return sharp({ create: { width: 8, height: 8, channels: 3, background: { r, g, b } } }).jpeg().toBuffer();
}
function png(r: number, g: number, b: number): Promise<Buffer> {
  return sharp({ create: { width: 8, height: 8, channels: 3, background: { r, g, b } } }).png().toBuffer();
}

/** The 12 ClassLabel names (alphabetical, as HF imagefolder assigns them) of the 12-class garbage set. */
const NEO_NAMES = [
  "battery", "biological", "brown-glass", "cardboard", "clothes", "green-glass",
  "metal", "paper", "plastic", "shoes", "trash", "white-glass",
];

/** Entries of a folder, with no hidden files or partial dirs left behind. */
function siblings(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).sort() : [];
}

// ---------------------------------------------------------------------------
// A fake Hugging Face hub on 127.0.0.1 with the real API shape:
//   GET /api/datasets/{repo}/tree/{rev}?recursive=true&expand=false[&cursor=N]
//       -> JSON array of {type, oid, size, path}, paginated with a Link: <...>; rel="next" header
//   GET /datasets/{repo}/resolve/{rev}/{path}
//       -> Range: bytes=0-0 probe answered 206 + Content-Range + ETag; then the full body;
//          404 + X-Error-Code: EntryNotFound when missing
// ---------------------------------------------------------------------------

type FakeHub = {
  url: string;
  requests: string[];
  stop: () => void;
  setFail: (status: number | null) => void;
  failPath: (path: string) => void;
};

function fakeHub(repo: string, files: Record<string, Uint8Array | string>, pageSize = 3): FakeHub {
  const enc = new TextEncoder();
  const bytesOf = (v: Uint8Array | string) => (typeof v === "string" ? enc.encode(v) : new Uint8Array(v));
  const blobs = new Map(Object.entries(files).map(([k, v]) => [k, bytesOf(v)]));
  const dirs = new Set<string>();
  for (const p of blobs.keys()) {
    const parts = p.split("/");
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join("/"));
  }
  const entries = [
    ...[...dirs].map((p) => ({ type: "directory", oid: "d" + p.length, size: 0, path: p })),
    ...[...blobs].map(([p, b]) => ({ type: "file", oid: "f" + b.length, size: b.length, path: p })),
  ].sort((a, b) => (a.path < b.path ? -1 : 1));
  const requests: string[] = [];
  let fail: number | null = null;
  const failing = new Set<string>();
  const treePrefix = `/api/datasets/${repo}/tree/main`;
  const resolvePrefix = `/datasets/${repo}/resolve/main/`;
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch(req) {
      const u = new URL(req.url);
      requests.push(`${req.method} ${u.pathname}${u.search}`);
      if (fail !== null) return new Response("boom", { status: fail });
      if (u.pathname === treePrefix) {
        if (u.searchParams.get("recursive") !== "true") return new Response("need recursive", { status: 400 });
        const cursor = Number(u.searchParams.get("cursor") ?? "0");
        const page = entries.slice(cursor, cursor + pageSize);
        const headers: Record<string, string> = { "content-type": "application/json" };
        if (cursor + pageSize < entries.length) {
          const next = `${u.origin}${treePrefix}?recursive=true&expand=false&cursor=${cursor + pageSize}`;
          headers.link = `<${next}>; rel="next"`;
        }
        return new Response(JSON.stringify(page), { headers });
      }
      if (u.pathname.startsWith(resolvePrefix)) {
        const path = u.pathname.slice(resolvePrefix.length).split("/").map(decodeURIComponent).join("/");
        if (failing.has(path)) return new Response("upstream error", { status: 500 });
        const body = blobs.get(path);
        if (!body) return new Response("not found", { status: 404, headers: { "x-error-code": "EntryNotFound" } });
        const etag = `"${path.length}-${body.length}"`;
        if (req.headers.get("range") === "bytes=0-0") {
          return new Response(body.slice(0, 1), {
            status: 206,
            headers: { "content-range": `bytes 0-0/${body.length}`, etag, "content-type": "application/octet-stream" },
          });
        }
        return new Response(body, { headers: { etag, "content-type": "application/octet-stream" } });
      }
      return new Response("no route", { status: 404 });
    },
  });
  return {
    url: `http://127.0.0.1:${server.port}`,
    requests,
    stop: () => server.stop(true),
    setFail: (s) => {
      fail = s;
    },
    failPath: (p) => {
      failing.add(p);
    },
  };
}

// ---------------------------------------------------------------------------
// label table
// ---------------------------------------------------------------------------

describe("mapWasteLabel", () => {
  test("maps the 12 garbage-classification labels; clothes/shoes/trash stay unmapped", () => {
    const got = Object.fromEntries(NEO_NAMES.map((n) => [n, mapWasteLabel(n)]));
    expect(got).toEqual({
      battery: "ewaste",
      biological: "organic",
      "brown-glass": "recyclable",
      cardboard: "recyclable",
      clothes: null,
      "green-glass": "recyclable",
      metal: "recyclable",
      paper: "recyclable",
      plastic: "recyclable",
      shoes: null,
      trash: null,
      "white-glass": "recyclable",
    });
  });
  test("normalizes case, spaces and underscores; unknown -> null", () => {
    expect(mapWasteLabel("  Brown Glass ")).toBe("recyclable");
    expect(mapWasteLabel("E-Waste")).toBe("ewaste");
    expect(mapWasteLabel("food_organics")).toBe("organic");
    expect(mapWasteLabel("Batteries")).toBe("ewaste");
    expect(mapWasteLabel("spaceship")).toBeNull();
    expect(mapWasteLabel("toString")).toBeNull();
    expect(WASTE_CLASSES).toEqual(["ewaste", "recyclable", "organic"]);
  });
});

describe("classNamesFromReadme", () => {
  test("list form, dict form, several configs, missing", () => {
    const card = (body: string) => `---\n${body}\n---\n# card\n`;
    const listForm = [
      "dataset_info:", "  features:", "  - name: label", "    dtype:", "      class_label:",
      "        names: [battery, paper]",
    ];
    expect(classNamesFromReadme(card(listForm.join("\n")), "label")).toEqual(["battery", "paper"]);
    const dictForm = [
      "dataset_info:", "- config_name: a", "  features:", "  - name: image", "    dtype: image",
      "- config_name: b", "  features:", "  - name: label", "    dtype:", "      class_label:", "        names:",
      "          '1': paper", "          '0': battery",
    ];
    expect(classNamesFromReadme(card(dictForm.join("\n")), "label")).toEqual(["battery", "paper"]);
    expect(classNamesFromReadme(card("license: mit"), "label")).toBeNull();
    expect(classNamesFromReadme("# no front matter", "label")).toBeNull();
    expect(classNamesFromReadme(card("a: [unclosed"), "label")).toBeNull();
  });
});

// ---------------------------------------------------------------------------
// Hugging Face download
// ---------------------------------------------------------------------------

describe("downloadHfDataset", () => {
  test("image-folder layout -> ImageFolder of waste classes, reused without network", async () => {
    const repo = "acme/waste-folders";
    const hub = fakeHub(repo, {
      ".gitattributes": "*.jpg filter=lfs\n",
      "README.md": "# waste\n",
      "train/battery/b1.jpg": await jpeg(255, 0, 0),
      "train/battery/b 2.jpg": await jpeg(250, 0, 0),
      "train/Biological/o1.png": await png(0, 255, 0),
      "train/clothes/c1.jpg": await jpeg(0, 0, 255),
      "train/brown-glass/g1.jpg": await jpeg(120, 60, 0),
      "test/plastic/p1.jpg": await jpeg(200, 200, 200),
      "test/loose.jpg": await jpeg(1, 2, 3),
      "notes.txt": "not an image",
    });
    try {
      const dest = join(work, "hf-folders", "waste");
      const logs: string[] = [];
      const r = await downloadHfDataset({ repo, destDir: dest, hubUrl: hub.url, log: (l) => logs.push(l) });
      expect(r.root).toBe(dest);
      expect(r.classes).toEqual(["ewaste", "organic", "recyclable"]);
      expect(r.counts).toEqual({ ewaste: 2, organic: 1, recyclable: 2 });
      expect(r.unmapped).toEqual({ "(no label)": 1, clothes: 1 });
      expect(Object.keys(r.counts)).toEqual(["ewaste", "organic", "recyclable"]);
      // pagination was followed (page size 3, ~17 entries)
      expect(hub.requests.filter((q) => q.includes("/tree/main")).length).toBeGreaterThan(3);
      expect(logs.some((l) => l.includes("files: 5/5"))).toBe(true);

      const listed = listImageFolder(dest);
      expect(listed.classes).toEqual(["ewaste", "organic", "recyclable"]);
      expect(listed.files.length).toBe(5);
      for (const f of listed.files) {
        const meta = await sharp(f.path).metadata();
        expect(meta.width).toBe(8);
      }
      expect(listed.files.filter((f) => f.className === "ewaste").map((f) => f.path.split("/").pop())).toEqual([
        "train__battery__b1.jpg",
        "train__battery__b_2.jpg",
      ]);
      expect(siblings(dirname(dest))).toEqual(["waste"]);

      // second call: marker hit, no request to the hub
      const before = hub.requests.length;
      const again = await downloadHfDataset({ repo, destDir: dest, hubUrl: hub.url });
      expect(again).toEqual(r);
      expect(hub.requests.length).toBe(before);
    } finally {
      hub.stop();
    }
  });

  const parquetCase =
    "parquet layout: image struct + ClassLabel ints (names from parquet metadata or README), string labels";
  test(parquetCase, async () => {
    const repo = "NeoAivara/Waste_Classification_data";
    const imgs = [await jpeg(255, 0, 0), await jpeg(0, 255, 0), await png(0, 0, 255), await jpeg(9, 9, 9)];
    const imageSchema = [
      { name: "image", repetition_type: "OPTIONAL" as const, num_children: 2 },
      { name: "bytes", type: "BYTE_ARRAY" as const, repetition_type: "OPTIONAL" as const },
      {
        name: "path", type: "BYTE_ARRAY" as const, converted_type: "UTF8" as const,
        repetition_type: "OPTIONAL" as const,
      },
    ];
    const intLabelSchema = [
      { name: "schema", num_children: 2 }, ...imageSchema,
      { name: "label", type: "INT64" as const, repetition_type: "OPTIONAL" as const },
    ];
    const hfMeta = JSON.stringify({
      info: { features: { image: { _type: "Image" }, label: { names: NEO_NAMES, _type: "ClassLabel" } } },
    });
    // train: int64 labels; class names in the parquet "huggingface" metadata; 3 row groups
    const trainLabels = [0, 1, 2, 4, 10, 8, 0];
    const train = parquetWriteBuffer({
      columnData: [
        { name: "image", data: trainLabels.map((_, i) => ({ bytes: imgs[i % imgs.length], path: `img${i}.jpg` })) },
        { name: "label", data: trainLabels.map((l) => BigInt(l)) },
      ],
      schema: intLabelSchema,
      rowGroupSize: 3,
      kvMetadata: [{ key: "huggingface", value: hfMeta }],
    });
    // test: no parquet metadata; names only in the README YAML (dict form '0': name)
    const testLabels = [11, 9, 1, -1]; // -1: ClassLabel "no label"
    const test_ = parquetWriteBuffer({
      columnData: [
        { name: "image", data: testLabels.map((_, i) => ({ bytes: imgs[i], path: null })) },
        { name: "label", data: testLabels.map((l) => BigInt(l)) },
      ],
      schema: intLabelSchema,
    });
    // extra: a string label column
    const extra = parquetWriteBuffer({
      columnData: [
        { name: "image", data: [{ bytes: imgs[0], path: "x.jpg" }, { bytes: imgs[1], path: "y.jpg" }] },
        { name: "category", data: ["Food Organics", "keyboard"] },
      ],
      schema: [
        { name: "schema", num_children: 2 },
        ...imageSchema,
        { name: "category", type: "BYTE_ARRAY", converted_type: "UTF8", repetition_type: "OPTIONAL" },
      ],
    });
    const readme = [
      "---",
      "license: apache-2.0",
      "dataset_info:",
      "  features:",
      "  - name: image",
      "    dtype: image",
      "  - name: label",
      "    dtype:",
      "      class_label:",
      "        names:",
      ...NEO_NAMES.map((n, i) => `          '${i}': ${n}`),
      "  splits:",
      "  - name: train",
      "    num_examples: 7",
      "---",
      "# Waste",
    ].join("\n");
    const hub = fakeHub(repo, {
      "README.md": readme,
      "data/train-00000-of-00001.parquet": new Uint8Array(train),
      "data/test-00000-of-00001.parquet": new Uint8Array(test_),
      "extra/more.parquet": new Uint8Array(extra),
    });
    try {
      const dest = join(work, "hf-parquet", "waste");
      const logs: string[] = [];
      const r = await downloadHfDataset({ repo, destDir: dest, hubUrl: hub.url, log: (l) => logs.push(l) });
      // train: battery x2, biological, brown-glass, plastic (+clothes, trash unmapped)
      // test: white-glass, biological (+shoes unmapped); extra: Food Organics, keyboard
      expect(r.counts).toEqual({ ewaste: 3, organic: 3, recyclable: 3 });
      expect(r.unmapped).toEqual({ "(no label)": 1, clothes: 1, shoes: 1, trash: 1 });
      expect(r.classes).toEqual(["ewaste", "organic", "recyclable"]);
      expect(logs.some((l) => l.includes("parquet 3/3"))).toBe(true);
      expect(hub.requests.some((q) => q.endsWith("/README.md"))).toBe(true);

      const listed = listImageFolder(dest);
      expect(listed.files.length).toBe(9);
      const names = (c: string) => listed.files.filter((f) => f.className === c).map((f) => f.path.split("/").pop());
      expect(names("ewaste")).toEqual([
        "data__train-00000-of-00001__000000.jpg",
        "data__train-00000-of-00001__000006.png",
        "extra__more__000001.jpg",
      ]);
      expect(names("organic")).toEqual([
        "data__test-00000-of-00001__000002.png",
        "data__train-00000-of-00001__000001.jpg",
        "extra__more__000000.jpg",
      ]);
      expect(names("recyclable")).toEqual([
        "data__test-00000-of-00001__000000.jpg",
        "data__train-00000-of-00001__000002.png",
        "data__train-00000-of-00001__000005.jpg",
      ]);
      for (const f of listed.files) expect((await sharp(f.path).metadata()).width).toBe(8);
      // no raw parquet left in the ImageFolder, only class folders + marker
      expect(siblings(dest)).toEqual([".hf-download.json", "ewaste", "organic", "recyclable"]);

      const before = hub.requests.length;
      expect(await downloadHfDataset({ repo, destDir: dest, hubUrl: hub.url })).toEqual(r);
      expect(hub.requests.length).toBe(before);
    } finally {
      hub.stop();
    }
  });

  test("server error 500 -> one-line error naming --source, nothing left behind", async () => {
    const hub = fakeHub("acme/broken", { "a/battery/x.jpg": await jpeg(1, 1, 1) });
    hub.setFail(500);
    try {
      const parent = join(work, "hf-500");
      const dest = join(parent, "waste");
      const err = await downloadHfDataset({ repo: "acme/broken", destDir: dest, hubUrl: hub.url }).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(Error);
      const msg = err instanceof Error ? err.message : "";
      expect(msg).toContain("--source");
      expect(msg).toContain("acme/broken");
      expect(msg).toContain("500");
      expect(msg.includes("\n")).toBe(false);
      expect(existsSync(dest)).toBe(false);
      expect(existsSync(parent)).toBe(false); // the parent it created is removed again
    } finally {
      hub.stop();
    }
  });

  test("failure mid-download (one file 500s after the listing) leaves no half dataset", async () => {
    const repo = "acme/flaky";
    const hub = fakeHub(repo, {
      "battery/a.jpg": await jpeg(1, 1, 1),
      "paper/b.jpg": await jpeg(2, 2, 2),
      "paper/c.jpg": await jpeg(3, 3, 3),
    });
    hub.failPath("paper/c.jpg");
    try {
      const parent = join(work, "hf-flaky");
      const dest = join(parent, "waste");
      const err = await downloadHfDataset({ repo, destDir: dest, hubUrl: hub.url }).then(
        () => null,
        (e: unknown) => e,
      );
      const msg = err instanceof Error ? err.message : "";
      expect(msg).toContain("paper/c.jpg");
      expect(msg).toContain("--source");
      expect(msg.includes("\n")).toBe(false);
      // the other files were fetched, yet nothing of them remains
      expect(hub.requests.some((q) => q.endsWith("/resolve/main/battery/a.jpg"))).toBe(true);
      expect(existsSync(dest)).toBe(false);
      expect(siblings(parent)).toEqual([]);
    } finally {
      hub.stop();
    }
  });

  test("connection refused -> one-line error naming --source, nothing left behind", async () => {
    const probe = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("") });
    const url = `http://127.0.0.1:${probe.port}`;
    probe.stop(true);
    const parent = join(work, "hf-refused");
    const dest = join(parent, "waste");
    const err = await downloadHfDataset({ repo: "acme/none", destDir: dest, hubUrl: url }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(Error);
    const msg = err instanceof Error ? err.message : "";
    expect(msg).toContain("--source");
    expect(msg.includes("\n")).toBe(false);
    expect(existsSync(dest)).toBe(false);
    expect(siblings(parent)).toEqual([]);
  });

  test("an existing destination without a completed marker is refused, not overwritten", async () => {
    const dest = join(work, "hf-foreign", "waste");
    mkdirSync(join(dest, "mine"), { recursive: true });
    writeFileSync(join(dest, "mine", "keep.jpg"), "x");
    const refused = downloadHfDataset({ repo: "acme/x", destDir: dest, hubUrl: "http://127.0.0.1:9" });
    await expect(refused).rejects.toThrow("--source");
    expect(existsSync(join(dest, "mine", "keep.jpg"))).toBe(true);
  });

  test("a repo with neither parquet nor images (e.g. one zip) -> error naming what it found", async () => {
    const repo = "acme/zipped";
    const hub = fakeHub(repo, { "README.md": "# z", "dataset-splits.zip": "PK" });
    try {
      const dest = join(work, "hf-zip", "waste");
      await expect(downloadHfDataset({ repo, destDir: dest, hubUrl: hub.url }))
        .rejects.toThrow(/no parquet or image files.*\.zip.*--source/);
      expect(existsSync(dest)).toBe(false);
    } finally {
      hub.stop();
    }
  });

  test("no label maps to a waste class -> error listing the unmapped labels", async () => {
    const repo = "acme/unmapped";
    const hub = fakeHub(repo, { "shoes/a.jpg": await jpeg(1, 1, 1), "clothes/b.jpg": await jpeg(2, 2, 2) });
    try {
      const dest = join(work, "hf-unmapped", "waste");
      await expect(downloadHfDataset({ repo, destDir: dest, hubUrl: hub.url }))
        .rejects.toThrow(/WASTE_LABEL_MAP.*--source/);
      expect(existsSync(dest)).toBe(false);
    } finally {
      hub.stop();
    }
  });
});

// ---------------------------------------------------------------------------
// CIFAR-100
// ---------------------------------------------------------------------------

/** n records in the official layout; pixel (c, p) of record i = (i*7 + c*50 + p) & 255. */
function cifarBin(labels: { coarse: number; fine: number }[]): Uint8Array {
  const buf = new Uint8Array(labels.length * 3074);
  labels.forEach((l, i) => {
    const off = i * 3074;
    buf[off] = l.coarse;
    buf[off + 1] = l.fine;
    for (let c = 0; c < 3; c++) for (let p = 0; p < 1024; p++) buf[off + 2 + c * 1024 + p] = (i * 7 + c * 50 + p) & 255;
  });
  return buf;
}

/** A minimal POSIX ustar archive (written by hand, independent of the extractor). */
function ustar(entries: { name: string; data?: Uint8Array }[]): Uint8Array<ArrayBuffer> {
  const blocks: Uint8Array[] = [];
  const enc = new TextEncoder();
  for (const e of entries) {
    const h = new Uint8Array(512);
    const put = (s: string, at: number) => h.set(enc.encode(s), at);
    const isDir = e.data === undefined;
    const size = e.data?.length ?? 0;
    put(e.name, 0);
    put(isDir ? "0000755\0" : "0000644\0", 100);
    put("0000000\0", 108);
    put("0000000\0", 116);
    put(size.toString(8).padStart(11, "0") + "\0", 124);
    put("14000000000\0", 136);
    put("        ", 148);
    put(isDir ? "5" : "0", 156);
    put("ustar\0", 257);
    put("00", 263);
    let sum = 0;
    for (const b of h) sum += b;
    put(sum.toString(8).padStart(6, "0") + "\0 ", 148);
    blocks.push(h);
    if (e.data) {
      const padded = new Uint8Array(Math.ceil(size / 512) * 512);
      padded.set(e.data);
      blocks.push(padded);
    }
  }
  blocks.push(new Uint8Array(1024));
  const out = new Uint8Array(blocks.reduce((n, b) => n + b.length, 0));
  let o = 0;
  for (const b of blocks) {
    out.set(b, o);
    o += b.length;
  }
  return out;
}

describe("CIFAR-100", () => {
  test("parseCifar100Bin: labels and HWC RGB pixels", () => {
    const labels = [
      { coarse: 3, fine: 17 },
      { coarse: 0, fine: 0 },
      { coarse: 19, fine: 99 },
      { coarse: 7, fine: 42 },
      { coarse: 11, fine: 5 },
    ];
    const r = parseCifar100Bin(cifarBin(labels));
    expect(r.n).toBe(5);
    expect([...r.coarse]).toEqual([3, 0, 19, 7, 11]);
    expect([...r.fine]).toEqual([17, 0, 99, 42, 5]);
    expect(r.images.length).toBe(5 * 32 * 32 * 3);
    for (const i of [0, 2, 4]) {
      for (const p of [0, 1, 31, 32, 500, 1023]) {
        for (let c = 0; c < 3; c++) {
          expect(r.images[(i * 1024 + p) * 3 + c]).toBe((i * 7 + c * 50 + p) & 255);
        }
      }
    }
    // pixel (row 1, col 2) of image 3 is p = 34
    const y = 1, x = 2, p = y * 32 + x;
    expect([...r.images.subarray((3 * 1024 + p) * 3, (3 * 1024 + p) * 3 + 3)]).toEqual([21 + p, 71 + p, 121 + p]);
  });

  test("parseCifar100Bin: wrong length -> clear error", () => {
    expect(() => parseCifar100Bin(new Uint8Array(3075))).toThrow(/3074/);
    expect(() => parseCifar100Bin(new Uint8Array(0))).toThrow(/3074/);
  });

  test("downloadCifar100 over HTTP (official tar.gz layout), loadCifar100, reuse, failure", async () => {
    const fineNames = Array.from({ length: 100 }, (_, i) => `fine_${i}`);
    const coarseNames = Array.from({ length: 20 }, (_, i) => `coarse_${i}`);
    const train = cifarBin([
      { coarse: 1, fine: 10 },
      { coarse: 2, fine: 20 },
      { coarse: 3, fine: 30 },
      { coarse: 4, fine: 99 },
      { coarse: 5, fine: 50 },
    ]);
    const test_ = cifarBin([
      { coarse: 6, fine: 60 },
      { coarse: 7, fine: 70 },
    ]);
    const enc = new TextEncoder();
    const tgz = Bun.gzipSync(
      ustar([
        { name: "cifar-100-binary/" },
        { name: "cifar-100-binary/coarse_label_names.txt", data: enc.encode(coarseNames.join("\n") + "\n") },
        { name: "cifar-100-binary/fine_label_names.txt", data: enc.encode(fineNames.join("\n") + "\n\n") },
        { name: "cifar-100-binary/test.bin", data: test_ },
        { name: "cifar-100-binary/train.bin", data: train },
      ]),
    );
    let hits = 0;
    const server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch(req) {
        hits++;
        const u = new URL(req.url);
        if (u.pathname === "/cifar-100-binary.tar.gz") {
          const headers = { "content-type": "application/gzip", "content-length": String(tgz.length) };
          return new Response(tgz, { headers });
        }
        return new Response("missing", { status: 404 });
      },
    });
    try {
      const base = `http://127.0.0.1:${server.port}`;
      const dest = join(work, "cifar");
      const logs: string[] = [];
      const url = `${base}/cifar-100-binary.tar.gz`;
      const dir = await downloadCifar100({ destDir: dest, url, log: (l) => logs.push(l) });
      expect(dir).toBe(join(dest, "cifar-100-binary"));
      expect(siblings(dest)).toEqual(["cifar-100-binary"]);
      expect(logs.some((l) => l.includes("100%"))).toBe(true);

      const data = loadCifar100(dir);
      expect(data.classNames).toEqual(fineNames);
      expect(data.train.n).toBe(5);
      expect([...data.train.labels]).toEqual([10, 20, 30, 99, 50]);
      expect(data.test.n).toBe(2);
      expect([...data.test.labels]).toEqual([60, 70]);
      expect(data.test.images[(1 * 1024 + 3) * 3 + 2]).toBe((7 + 100 + 3) & 255);
      expect(loadCifar100(dest).train.n).toBe(5); // parent folder works too

      const before = hits;
      expect(await downloadCifar100({ destDir: dest, url: `${base}/cifar-100-binary.tar.gz` })).toBe(dir);
      expect(hits).toBe(before);

      const bad = join(work, "cifar-404");
      await expect(downloadCifar100({ destDir: bad, url: `${base}/nope.tar.gz` })).rejects.toThrow(/404.*--source/);
      expect(existsSync(bad)).toBe(false);

      // an archive without the official layout is rejected, nothing kept
      const wrong = join(work, "cifar-wrong");
      const wrongServer = Bun.serve({
        hostname: "127.0.0.1",
        port: 0,
        fetch: () => new Response(Bun.gzipSync(ustar([{ name: "other/readme.txt", data: enc.encode("hi") }]))),
      });
      try {
        const url = `http://127.0.0.1:${wrongServer.port}/x.tgz`;
        await expect(downloadCifar100({ destDir: wrong, url })).rejects.toThrow(/train\.bin/);
        expect(existsSync(wrong)).toBe(false);
      } finally {
        wrongServer.stop(true);
      }
    } finally {
      server.stop(true);
    }
  });
});

// ---------------------------------------------------------------------------
// listImageFolder
// ---------------------------------------------------------------------------

describe("listImageFolder", () => {
  test("sorted classes, recursive image files, hidden and non-image files skipped", () => {
    const root = join(work, "folder");
    const put = (rel: string) => {
      mkdirSync(dirname(join(root, rel)), { recursive: true });
      writeFileSync(join(root, rel), "x");
    };
    put("zebra/b.JPG");
    put("zebra/a.png");
    put("zebra/sub/deeper/c.webp");
    put("zebra/notes.txt");
    put("zebra/.hidden.jpg");
    put("apple/x.jpeg");
    put("apple/y.HEIC");
    put(".cache/z.jpg");
    put("loose.jpg");
    mkdirSync(join(root, "empty"), { recursive: true });
    const r = listImageFolder(root);
    expect(r.classes).toEqual(["apple", "zebra"]);
    expect(r.files.map((f) => [f.path.slice(root.length + 1), f.className])).toEqual([
      ["apple/x.jpeg", "apple"],
      ["apple/y.HEIC", "apple"],
      ["zebra/a.png", "zebra"],
      ["zebra/b.JPG", "zebra"],
      ["zebra/sub/deeper/c.webp", "zebra"],
    ]);
  });

  test("links: files are read; a loop, a second path or a broken link is named and not followed", () => {
    const outer = join(work, "links");
    const root = join(outer, "root");
    const put = (path: string) => {
      mkdirSync(dirname(path), { recursive: true });
      writeFileSync(path, "x");
    };
    for (const f of ["a/x.jpg", "b/y.jpg", ".hidden/h.jpg"]) put(join(root, f));
    put(join(outer, "elsewhere", "z.jpg"));
    symlinkSync("../..", join(root, "a", "up")); // to `outer`, which holds the root: a loop
    symlinkSync("../b", join(root, "a", "b-again")); // b is listed as its own class already
    symlinkSync("../.hidden", join(root, "a", "hid")); // hidden folders are not walked: the one way there
    symlinkSync(join(outer, "elsewhere"), join(root, "c")); // a class folder kept elsewhere
    symlinkSync(join(outer, "elsewhere"), join(root, "b", "more")); // the same folder again
    symlinkSync("../a/x.jpg", join(root, "b", "x-link.jpg")); // a file: read (the dedupe sees the same bytes)
    symlinkSync("nowhere.jpg", join(root, "b", "broken.jpg"));
    symlinkSync(join(outer, "elsewhere", "z.jpg"), join(root, "b", "z-link.jpg"));
    const r = listImageFolder(root);
    expect(r.classes).toEqual(["a", "b", "c"]);
    expect(r.files.map((f) => [f.path.slice(root.length + 1), f.className])).toEqual([
      ["a/hid/h.jpg", "a"],
      ["a/x.jpg", "a"],
      ["b/x-link.jpg", "b"],
      ["b/y.jpg", "b"],
      ["b/z-link.jpg", "b"],
      ["c/z.jpg", "c"],
    ]);
    const skipped = Object.fromEntries(r.skippedLinks.map((l) => [l.path.slice(root.length + 1), l.reason]));
    expect(Object.keys(skipped).sort()).toEqual(["a/b-again", "a/up", "b/broken.jpg", "b/more"]);
    expect(skipped["a/up"]).toStartWith("a loop: it leads back to ");
    expect(skipped["a/b-again"]).toBe(`a second path to ${root}/b, whose photos are listed there, once`);
    expect(skipped["b/broken.jpg"]).toBe("a broken link (its target nowhere.jpg does not exist)");
    expect(skipped["b/more"]).toContain("already listed");
    const lines = linkReport(r, root);
    expect(lines).toContain(`warning: ${root}/a/up: link not followed: ${skipped["a/up"]}`);
    expect(lines).toContain(`warning: 4 link(s) in ${root} not followed (above)`);
    expect(lines.filter((l) => l.startsWith("note: ") && l.endsWith(": followed")).length).toBe(2); // a/hid and c
    const outside = `note: 1 image file(s) in ${root} are links to files outside it`;
    expect(lines.some((l) => l.startsWith(outside))).toBe(true);
    // Links alone, all of them loops: no class folder, and the error says which links were not followed.
    const only = join(outer, "only");
    mkdirSync(only);
    symlinkSync("..", join(only, "self"));
    expect(() => listImageFolder(only)).toThrow(/no class folders .*self: a loop/);
  });

  test("missing root / no class folders -> error naming the path", () => {
    const missing = join(work, "does-not-exist");
    expect(() => listImageFolder(missing)).toThrow(missing);
    const flat = join(work, "flat");
    mkdirSync(flat, { recursive: true });
    writeFileSync(join(flat, "a.jpg"), "x");
    expect(() => listImageFolder(flat)).toThrow(/no class folders/);
    expect(() => listImageFolder(flat)).toThrow(flat);
  });
});
