import { defineConfig } from "vite";

// Only VCN_WEB_* variables reach the page (see src/session.ts); they are
// read when the page is built or served, never stored in the repository.
export default defineConfig({
  envPrefix: "VCN_WEB_",
  server: { host: "127.0.0.1", port: 5173, strictPort: true },
  preview: { host: "127.0.0.1", port: 4173, strictPort: true },
  build: { target: "es2022" },
});
