/// <reference types="vite/client" />

interface ImportMetaEnv {
  /** Where vcn serves gRPC-Web, e.g. http://127.0.0.1:50051. */
  readonly VCN_WEB_SERVER?: string;
  /** The cards key of this session (dev only: see src/session.ts). */
  readonly VCN_WEB_API_KEY?: string;
  /** The customer whose cards the page shows. */
  readonly VCN_WEB_OWNER?: string;
}

interface ImportMeta {
  readonly env: ImportMetaEnv;
}
