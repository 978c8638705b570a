// A web banking page: lists the customer's virtual cards and issues new
// ones, calling vcn's CardService directly over gRPC-Web (connect-web's
// gRPC-Web transport, code generated from ../../proto by protoc-gen-es).
//
// The full virtual number and CVV come back once, in IssueCardResponse;
// this page never puts them in the document: it shows the masked number
// only (the cardholder gets the full number through the bank's own
// channel, e.g. the mobile app's secure card view).
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { CardService, CardState, type Card } from "./gen/vcn/v1/vcn_pb.js";
import { loadSession, type Session } from "./session";
import { formatMoney, parseAmount } from "./money";

const STATES: Record<CardState, string> = {
  [CardState.UNSPECIFIED]: "unknown",
  [CardState.ACTIVE]: "active",
  [CardState.PAUSED]: "paused",
  [CardState.BLOCKED]: "blocked",
  [CardState.USED]: "used",
  [CardState.CLOSED]: "closed",
};
/** Pages of ListCards read at most (500 cards each). */
const MAX_PAGES = 20;

function el<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}

function showError(message: string | null): void {
  const box = el<HTMLParagraphElement>("error");
  box.textContent = message ?? "";
  box.hidden = message === null;
}

/** What went wrong, in words: the service's message names the field. */
function describe(e: unknown): string {
  if (e instanceof ConnectError) {
    if (e.code === Code.Unavailable || e.code === Code.Unknown) {
      return `The card service cannot be reached (${e.rawMessage || Code[e.code]}).`;
    }
    return `${e.rawMessage} (${Code[e.code]})`;
  }
  return e instanceof Error ? e.message : String(e);
}

function cardsClient(session: Session) {
  const bearer: Interceptor = (next) => async (req) => {
    req.header.set("authorization", `Bearer ${session.apiKey}`);
    return next(req);
  };
  const transport = createGrpcWebTransport({
    baseUrl: session.server,
    interceptors: [bearer],
    defaultTimeoutMs: 10_000,
  });
  return createClient(CardService, transport);
}

type Cards = ReturnType<typeof cardsClient>;

async function listCards(cards: Cards, owner: string): Promise<Card[]> {
  const all: Card[] = [];
  let pageToken = "";
  for (let i = 0; i < MAX_PAGES; i++) {
    const page = await cards.listCards({ owner, pageSize: 500, pageToken });
    all.push(...page.cards);
    pageToken = page.nextPageToken;
    if (!pageToken) break;
  }
  return all;
}

function renderCards(list: Card[]): void {
  const body = el<HTMLTableElement>("cards").tBodies[0];
  const rows = list.map((card) => {
    const tr = document.createElement("tr");
    tr.dataset.cardId = card.cardId;
    const cells = [
      card.maskedPan,
      STATES[card.state] ?? "unknown",
      formatMoney(card.spendLimit),
      formatMoney(card.spent),
      formatMoney(card.remaining),
      card.validUntil ? timestampDate(card.validUntil).toISOString().slice(0, 10) : "",
    ];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 0) td.className = "pan";
      tr.append(td);
    });
    return tr;
  });
  body.replaceChildren(...rows);
  el("no-cards").hidden = list.length > 0;
}

async function refresh(cards: Cards, owner: string): Promise<void> {
  renderCards(await listCards(cards, owner));
}

function wireIssueForm(cards: Cards, owner: string): void {
  const form = el<HTMLFormElement>("issue");
  const pan = el<HTMLInputElement>("funding-pan");
  const amount = el<HTMLInputElement>("amount");
  const currency = el<HTMLSelectElement>("currency");
  const days = el<HTMLInputElement>("valid-days");
  const issued = el<HTMLParagraphElement>("issued");
  const button = form.querySelector("button") as HTMLButtonElement;
  // One key per card the customer means to issue: a retried or
  // double-submitted form gets the same card back, not a second one.
  let idempotencyKey = crypto.randomUUID();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(null);
    issued.hidden = true;
    const fundingPan = pan.value.replace(/[\s-]/g, "");
    if (!/^\d{13,19}$/.test(fundingPan)) {
      showError("funding card number: 13 to 19 digits");
      return;
    }
    const limit = parseAmount(amount.value, currency.value);
    if (typeof limit === "string") {
      showError(limit);
      return;
    }
    const validDays = Number(days.value);
    if (!Number.isInteger(validDays) || validDays < 1 || validDays > 1830) {
      showError("valid for: a whole number of days from 1 to 1830");
      return;
    }
    const validUntil = new Date(Date.now() + validDays * 86_400_000);
    button.disabled = true;
    try {
      const res = await cards.issueCard({
        fundingPan,
        owner,
        spendLimit: { amountMinor: limit, currency: currency.value },
        validUntil: timestampFromDate(validUntil),
        idempotencyKey,
      });
      // Only the masked number is kept; res.pan and res.cvv are dropped here.
      const masked = res.card?.maskedPan ?? "";
      idempotencyKey = crypto.randomUUID();
      form.reset();
      issued.textContent = `Card issued: ${masked}`;
      issued.dataset.maskedPan = masked;
      issued.hidden = false;
      await refresh(cards, owner);
    } catch (e) {
      showError(describe(e));
    } finally {
      button.disabled = false;
    }
  });
}

async function main(): Promise<void> {
  const session = loadSession();
  if ("missing" in session) {
    showError(
      `No session: set ${session.missing.join(" and ")} when building or serving the page (see examples/web/README.md).`,
    );
    el<HTMLFormElement>("issue").hidden = true;
    return;
  }
  el("customer").textContent = `Customer ${session.owner}`;
  const cards = cardsClient(session);
  wireIssueForm(cards, session.owner);
  try {
    await refresh(cards, session.owner);
  } catch (e) {
    showError(describe(e));
  }
  document.body.dataset.ready = "true";
}

void main();
