"""Seeded generator of synthetic Italian business emails with entity labels: the demo's data.

    python scripts/make_demo_data.py                       # data/emails.csv + data/emails_unlabelled.jsonl
    python scripts/make_demo_data.py --rows 50 --unlabelled-rows 0 --out-dir /tmp/demo   # a small sample

Why synthetic: nothing may be downloaded here, and a newcomer must see fine-tuning work end to end.
Each email is rendered from one of ~50 body templates in 13 categories (orders, invoices, payments,
meetings, complaints, shipments, HR, quotes, IT, contracts, events, supplier records, expenses),
with randomised subject line, greeting, extra sentences, sign-off and signature, and phrasing
alternatives `[[a|b]]` inside templates. Names and places come from Faker's it_IT lists; companies,
phones, amounts, dates, IBANs and invoice numbers are composed here in the usual Italian formats.

Labels (`output_text`, the entity format of docs/DESIGN.md): one `text: TYPE` line per distinct entity, in
order of first appearance; types PER, ORG, LOC, DATE, EMAIL, PHONE, MONEY, IBAN, INVOICE. Every span
is recorded while the template is rendered, so it occurs verbatim in `input_text` by construction.
Conventions (kept consistent so that a small model can learn them): titles stay outside PER
("dott.ssa Bianchi" -> "Bianchi"); LOC is a town or city name; DATE is a calendar date (weekday
included when written), never a relative one ("domani") or a time; MONEY includes its currency sign
or word; order numbers, tracking codes, quantities and times are not entities.

Determinism: one `random.Random(seed)` drives every choice and Faker's instance is seeded with the
same seed, so the same seed and the same Faker version give byte-identical files (FAKER_VERSION is
the version the committed files were made with).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import json
import os
import random
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from faker import Faker
from faker.providers.address.it_IT import Provider as ItalianAddresses

FAKER_VERSION = "40.54.0"  # the committed data files were generated with this Faker release
LABELLED_SEED, LABELLED_ROWS = 1234, 5500
UNLABELLED_SEED, UNLABELLED_ROWS = 5678, 20000
ROOT = Path(__file__).resolve().parent.parent
TYPES = ("PER", "ORG", "LOC", "DATE", "EMAIL", "PHONE", "MONEY", "IBAN", "INVOICE")

# ----------------------------------------------------------------------------------------------------
# vocabulary

BIG_CITIES = [
    "Milano", "Roma", "Torino", "Napoli", "Bologna", "Firenze", "Genova", "Venezia", "Verona", "Padova",
    "Bari", "Palermo", "Catania", "Brescia", "Bergamo", "Parma", "Modena", "Reggio Emilia", "Trento",
    "Bolzano", "Udine", "Trieste", "Vicenza", "Treviso", "Como", "Monza", "Varese", "Novara", "Pavia",
    "Piacenza", "Ancona", "Pescara", "Perugia", "Livorno", "Pisa", "Lucca", "Prato", "Rimini", "Ravenna",
    "Ferrara", "Forlì", "Cagliari", "Sassari", "Salerno", "Lecce", "Taranto", "Messina", "Cosenza",
    "La Spezia", "Cantù", "Sesto San Giovanni", "Città di Castello", "Reggio Calabria", "L'Aquila",
]
# Faker's ~16k Italian comuni; sorted because Faker builds that list from a set (hash-seed dependent order)
TOWNS = sorted(set(ItalianAddresses.cities))
SECTORS = ["Logistica", "Trasporti", "Costruzioni", "Impianti", "Meccanica", "Arredamenti", "Alimentari",
           "Tessile", "Informatica", "Consulting", "Forniture", "Serramenti", "Elettronica", "Packaging",
           "Ceramiche", "Vini", "Plastica", "Metalli", "Servizi", "Energia", "Automazione", "Grafica"]
BRAND_HEADS = ["Tecno", "Edil", "Idro", "Elettro", "Termo", "Agri", "Meccano", "Info", "Eco", "Metal",
               "Euro", "Ital", "Medi", "Nord", "Alpi", "Adria", "Lario", "Vetro", "Sider", "Omni"]
BRAND_TAILS = ["plast", "sistemi", "service", "tech", "impianti", "forniture", "trasporti", "logica", "data",
               "casa", "gas", "form", "net", "line", "pack", "vetri", "legno", "mec", "chimica", "lab"]
LEGAL = ["S.r.l.", "S.p.A.", "srl", "S.r.l.s.", "S.n.c.", "S.a.s.", "SpA", "Srl"]
COURIERS = ["BRT", "GLS", "SDA Express Courier", "DHL Express", "UPS", "Poste Italiane", "TNT", "Fercam"]
BANKS = ["Intesa Sanpaolo", "UniCredit", "Banco BPM", "BPER Banca", "Banca Sella", "Crédit Agricole Italia",
         "Banca Monte dei Paschi di Siena", "Banca Popolare di Sondrio", "Credem", "Banca Ifis"]
TITLES_M = ["dott.", "ing.", "avv.", "sig.", "geom.", "rag.", "prof.", "Dott.", "Ing.", "Sig."]
TITLES_F = ["dott.ssa", "ing.", "avv.", "sig.ra", "prof.ssa", "Dott.ssa", "Sig.ra", "Ing."]
ROLES = ["Responsabile Acquisti", "Ufficio Amministrazione", "Direttore Commerciale", "Customer Care",
         "HR Manager", "Responsabile Logistica", "Amministratore Delegato", "Segreteria Generale",
         "Ufficio Tecnico", "Account Manager", "Responsabile Qualità", "Ufficio Personale",
         "Area Manager Nord-Est", "Contabilità Fornitori", "Ufficio Spedizioni", "Responsabile IT"]
POSITIONS = ["impiegato amministrativo", "magazziniere", "addetta alla contabilità", "tecnico manutentore",
             "sviluppatore software", "responsabile di produzione", "agente di commercio",
             "assistente di direzione", "operatore logistico", "progettista meccanico", "buyer junior",
             "addetto al customer service", "controller", "responsabile qualità"]
DEPTS = ["amministrazione", "logistica", "ufficio acquisti", "ufficio tecnico", "produzione", "vendite",
         "risorse umane", "magazzino", "customer care", "contabilità"]
PRODUCTS = ["risme di carta A4", "bancali di piastrelle in gres", "stampanti laser", "cartucce toner",
            "sedie ergonomiche", "scaffalature metalliche", "bottiglie di olio extravergine",
            "bobine di cavo elettrico", "confezioni di guanti in nitrile", "notebook",
            "sacchi di caffè in grani",
            "etichette adesive", "cartoni di vino rosso", "pannelli fotovoltaici", "valvole in ottone",
            "rotoli di pellicola estensibile", "monitor da 27 pollici", "scatole di viti inox",
            "divise da lavoro", "casse di detergente industriale", "lampade LED da esterno",
            "cuscinetti a sfera", "pallet di pellet", "tavoli da riunione", "kit di pronto soccorso"]
MONTHS = ["gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno", "luglio", "agosto", "settembre",
          "ottobre", "novembre", "dicembre"]
WEEKDAYS = ["lunedì", "martedì", "mercoledì", "giovedì", "venerdì", "sabato", "domenica"]
AREA_CODES = ["02", "06", "011", "010", "051", "055", "081", "041", "045", "049", "030", "035", "0521",
              "0522", "059", "071", "080", "091", "095", "070", "0432", "0461", "0471", "0444", "031"]
MOBILE = ["320", "328", "329", "331", "333", "334", "335", "338", "339", "340", "345", "347", "348",
          "349", "351", "366", "380", "388", "392", "393"]
TIMES = ["9:00", "9:30", "10:00", "10:30", "11:00", "11:30", "12:00", "14:00", "14:30", "15:00", "15.30",
         "16:00", "16:30", "17:00", "17.30", "18:00"]

# ----------------------------------------------------------------------------------------------------
# templates: {slot[:spec]} fills an entity or a filler; [[a|b|c]] picks one phrasing

GREETINGS_FORMAL = [
    "Gentile {rcpt},", "Gentile {rcpt_title},", "Buongiorno {rcpt},", "Buongiorno,", "Salve,",
    "Spett.le {rorg},", "Alla cortese attenzione di {rcpt},", "{g:rcpt:Egregio:Gentilissima} {rcpt_title},",
    "Gentilissimi,", "Buongiorno {rcpt_title},", "Buonasera,", "Gentile cliente,", "Egregi signori,",
    "Buongiorno {rcpt_first},", "Gentile {rcpt_first},",
]
GREETINGS_INFORMAL = ["Ciao {rcpt_first},", "Car{g:rcpt:o:a} {rcpt_first},", "Ciao a tutti,", "Ciao,",
                      "Buongiorno a tutti,", "Buongiorno {rcpt_first},", "Ciao {rcpt_first}, tutto bene?"]
OPENERS = ["Spero che stiate tutti bene.", "Vi scrivo per conto di {org}.", "Come anticipato al telefono,",
           "Faccio seguito alla telefonata di ieri.", "Scusate il ritardo nella risposta.",
           "In riferimento alla vostra richiesta,", "Vi contatto a nome di {p1}."]
OPENERS_INFORMAL = ["Spero tutto bene.", "Scusa se ti scrivo solo ora.", "Come ti dicevo stamattina,"]
CLOSINGS = ["Cordiali saluti,", "Distinti saluti,", "Un cordiale saluto,", "Grazie e buona giornata,",
            "A presto,", "Saluti,", "Resto in attesa di un vostro riscontro.\nCordiali saluti,",
            "Buon lavoro,", "Grazie mille,", "Grazie per la collaborazione.\nSaluti,", "Cordialmente,",
            "In attesa di riscontro,", "Ringraziando anticipatamente, porgo distinti saluti."]
CLOSINGS_INFORMAL = ["Grazie!", "A presto,", "Ciao,", "Un saluto,", "Buona giornata!", "Grazie mille,"]
SIGNATURES = [
    "{sender}", "{sender}\n{role}", "{sender}\n{role} - {org}", "{sender}\n{org}",
    "{sender}\n{org}\nTel. {phone}", "{sender}\n{role}\n{org}\n{phone} | {sender_email}",
    "{sender} ({org})", "{sender}\n{org}\n{sender_email}", "{sender_title}\n{role}\n{org}",
    "{sender}\n{org} - {city9}\nTel. {phone}", "{sender}\n{role}\nCell. {mobile}", "{org}\n{role}",
    "--\n{sender}\n{role}, {org}\nT. {phone}\nE. {sender_email}",
]
SIGNATURES_INFORMAL = ["{sender_first}", "{sender}", "{sender_first}\n{mobile}", "{sender_first} ({dept})"]

# category -> informal (probability of an internal, first-name email), templates ("subject|subject",
# body), extras (optional sentences). The bodies are the distinct templates: 58 in all.
CATEGORIES: dict[str, dict] = {
    "ordine": dict(
        templates=[
            ("Ordine {ordno}|Conferma ordine {ordno}",
             "[[vi confermiamo|con la presente confermiamo]] l'ordine {ordno} per {qty} {product}, con "
             "consegna presso il nostro magazzino di {city} entro {date:il}. L'importo complessivo "
             "concordato è di {money}."),
            ("Nuovo ordine|Richiesta fornitura",
             "vorremmo ordinare {qty} {product} alle condizioni del listino in vigore. Vi chiediamo di "
             "confermare [[disponibilità e tempi di consegna|la disponibilità e la data di consegna]] a "
             "{city}. Per l'ordine fa riferimento {p1}, che potete contattare al numero {phone2}."),
            ("Modifica ordine {ordno}|Variazione quantità",
             "in riferimento al nostro ordine {ordno} {date:del}, vi chiediamo di portare la quantità a "
             "{qty} {product} e di mantenere invariata la data di consegna. Il nuovo totale dovrebbe essere "
             "di {money}: attendiamo conferma."),
            ("Annullamento ordine {ordno}",
             "purtroppo dobbiamo annullare l'ordine {ordno} inviato {date:il}, perché il progetto di {rorg} "
             "a {city} è stato sospeso. [[Ci scusiamo per il disagio.|Ci scusiamo per l'inconveniente.]]"),
            ("Conferma ricezione ordine {ordno}|Ordine ricevuto",
             "abbiamo ricevuto il vostro ordine {ordno} e vi confermiamo che la merce partirà dal nostro "
             "stabilimento di {city} {date:il}. Il totale, IVA inclusa, è di {money}; la fattura seguirà "
             "alla spedizione."),
            ("Disponibilità merce|Ordine {ordno}: consegna parziale",
             "vi informiamo che parte dell'ordine {ordno} ({qty} {product}) non è al momento disponibile. "
             "Possiamo evadere [[una consegna parziale|metà della fornitura]] subito e il resto entro "
             "{date:il}. Fateci sapere se per {rorg} va bene."),
        ],
        extras=["Vi preghiamo di indicare il numero d'ordine su tutti i documenti di trasporto.",
                "Per urgenze potete scrivere a {sender_email}.",
                "La consegna va effettuata dalle 8:00 alle 12:00, dal lunedì al venerdì."],
    ),
    "fattura": dict(
        templates=[
            ("Fattura n. {inv}|Invio fattura {inv}",
             "in allegato trovate la fattura n. {inv} {date:del} relativa alla fornitura di {qty} {product}, "
             "per un importo di {money}. Il pagamento va effettuato con bonifico sull'IBAN {iban} entro "
             "{date2:il}."),
            ("Errore fattura {inv}|Contestazione fattura",
             "nella fattura {inv} che ci avete inviato l'importo indicato è {money}, mentre il prezzo "
             "concordato era di {money2:less}. Vi chiediamo di [[emettere una nota di credito|correggere il "
             "documento]] per la differenza."),
            ("Richiesta copia fattura|Fattura {inv} mancante",
             "non riusciamo a trovare la fattura n. {inv} {date:del}. Potreste inviarcene una copia "
             "all'indirizzo {email}? [[Grazie in anticipo.|Vi ringrazio.]]"),
            ("Nota di credito|Nota di credito su fattura {inv}",
             "vi trasmettiamo la nota di credito relativa alla fattura {inv}, per un importo di {money}, a "
             "seguito del reso della merce consegnata a {city}."),
            ("Aggiornamento coordinate bancarie|Nuovo IBAN",
             "vi comunichiamo che a partire {date:dal} le coordinate bancarie di {org} cambiano: il nuovo "
             "IBAN presso {bank} è {iban}. Vi preghiamo di aggiornare la vostra anagrafica fornitori."),
            ("Fattura {inv} scartata|Fattura elettronica",
             "la fattura {inv} è stata [[scartata dal Sistema di Interscambio|rifiutata dallo SdI]] perché "
             "il codice destinatario non è corretto. Ve la inviamo di nuovo oggi; l'importo di {money} resta "
             "invariato."),
        ],
        extras=["Per qualsiasi chiarimento contattate l'amministrazione al {phone}.",
                "Vi ricordiamo che le fatture vanno intestate a {rorg}, sede di {city2}.",
                "La fattura è disponibile anche nel vostro cassetto fiscale."],
    ),
    "pagamento": dict(
        templates=[
            ("Sollecito di pagamento|Fattura {inv} scaduta",
             "dai nostri controlli risulta ancora [[insoluta|non pagata]] la fattura {inv}, scaduta "
             "{date:il}, per un importo di {money}. Vi invitiamo a provvedere al saldo entro {date2:il} "
             "sull'IBAN {iban}."),
            ("Conferma bonifico|Pagamento fattura {inv}",
             "vi confermiamo di aver disposto oggi il bonifico di {money} a saldo della fattura {inv}. La "
             "valuta per il beneficiario sarà {date:il}."),
            ("Richiesta rateizzazione",
             "a causa di un momentaneo problema di liquidità vi chiediamo di poter pagare la fattura {inv} "
             "di {money} in tre rate mensili da {money2:third}, la prima {date:il}."),
            ("Ultimo avviso|Diffida di pagamento",
             "nonostante i precedenti solleciti la fattura {inv} di {money} non è stata ancora pagata. In "
             "mancanza del pagamento entro {date:il} saremo costretti ad affidare la pratica allo "
             "{lawfirm}."),
        ],
        extras=["Se avete già provveduto al pagamento, vi preghiamo di non tenere conto di questa email.",
                "Potete inviare la contabile a {email}."],
    ),
    "riunione": dict(
        informal=0.35,
        templates=[
            ("Richiesta incontro|Proposta di incontro",
             "vorrei fissare un incontro presso la vostra sede di {city} per discutere il rinnovo della "
             "collaborazione con {org}. [[Sarei disponibile|Avrei disponibilità]] {wdate} alle {time} "
             "oppure {date2:il} in mattinata."),
            ("Spostamento riunione|Riunione {date}: cambio data",
             "purtroppo la riunione prevista {date:per il} deve essere spostata a {wdate2} alle {time}, "
             "sempre nella sala riunioni di {city}. Mi scuso per il cambio di programma."),
            ("Invito call|Call di avanzamento",
             "ti invito alla call di avanzamento del progetto {wdate} alle {time}. Parteciperanno anche "
             "{p1} e {p2}; il link arriverà a breve con un invito separato."),
            ("Ordine del giorno|Agenda incontro {date}",
             "vi invio l'ordine del giorno dell'incontro {date:del} a {city}: stato delle consegne, nuovo "
             "listino prezzi e budget di {money} per il prossimo semestre. Se volete aggiungere un punto "
             "scrivete a {sender_email}."),
            ("Conferma partecipazione|Incontro {date}",
             "confermo la mia presenza all'incontro {date:del} presso {rorg}. Arriverò a {city} in treno "
             "verso le {time}; per qualsiasi cosa potete chiamarmi al {mobile}."),
            ("Annullamento incontro|Appuntamento annullato",
             "devo purtroppo annullare l'appuntamento {date:del} con {p1}. Propongo di risentirci la "
             "settimana successiva per fissare una nuova data."),
        ],
        extras=["Fammi sapere se l'orario ti va bene.", "La sala è prenotata per due ore.",
                "Porterò con me i dati di vendita aggiornati."],
    ),
    "reclamo": dict(
        templates=[
            ("Reclamo|Merce danneggiata",
             "la merce consegnata {date:il} nel nostro magazzino di {city} è arrivata danneggiata: {qty} "
             "{product} sono inutilizzabili. Chiediamo la sostituzione o un rimborso di {money}."),
            ("Ritardo nella consegna|Sollecito consegna ordine {ordno}",
             "l'ordine {ordno} doveva essere consegnato entro {date:il}, ma a oggi non abbiamo ricevuto "
             "nulla. Il ritardo sta bloccando la nostra produzione a {city}: vi chiediamo una data certa."),
            ("Prodotto non conforme|Merce errata",
             "la merce ricevuta ({qty} {product}) non corrisponde a quanto ordinato. Vi preghiamo di "
             "organizzare il ritiro "
             "presso la nostra sede di {city} e di inviarci la merce corretta entro {date:il}."),
            ("Segnalazione disservizio|Assistenza non raggiungibile",
             "da [[tre settimane|diversi giorni]] cerco di contattare la vostra assistenza al numero "
             "{phone2} senza ottenere risposta. Il problema segnalato a {p1} {date:il} non è ancora stato "
             "risolto."),
            ("Risposta al vostro reclamo|Rimborso ordine {ordno}",
             "ci scusiamo per il disagio causato dalla consegna del vostro ordine {ordno}. Abbiamo "
             "verificato il problema e riceverete un rimborso di {money} entro {date:il} sul conto "
             "indicato."),
        ],
        extras=["In allegato le foto della merce.", "Se non riceveremo risposta valuteremo altre soluzioni.",
                "Per qualsiasi informazione il referente è {p2}, {mobile}."],
    ),
    "spedizione": dict(
        templates=[
            ("Avviso di spedizione|Spedizione ordine {ordno}",
             "la vostra merce è partita [[oggi|questa mattina]] dal nostro deposito di {city} ed è affidata "
             "al corriere {courier}. La consegna a {city2} è prevista per {wdate}; il numero di tracciamento "
             "è {tracking}."),
            ("Mancata consegna|Giacenza pacco",
             "il corriere {courier} ha tentato la consegna del vostro pacco {date:il} ma non ha trovato "
             "nessuno. Per fissare una nuova consegna chiamate il {phone2} indicando il codice {tracking}."),
            ("Cambio indirizzo di consegna",
             "vi chiediamo di consegnare l'ordine {ordno} non più a {city} ma presso il nostro nuovo "
             "magazzino di {city2}. [[Il referente sul posto è|Chiedete di]] {p1}."),
            ("Dettagli spedizione|Spedizione ordine {ordno}",
             "la spedizione di {qty} {product} è composta da [[quattro|sei|due]] bancali per un peso totale "
             "di circa 900 kg. Lo scarico a {city} richiede un mezzo con sponda idraulica."),
            ("Ritiro merce|Appuntamento per il ritiro",
             "il ritiro della merce presso il magazzino di {city} è fissato per {wdate} tra le {time} e le "
             "18:00. Vi preghiamo di preparare i documenti di trasporto intestati a {rorg}."),
        ],
        extras=["Il costo della spedizione è di {money2:s}.",
                "Potete seguire la spedizione sul sito del corriere.",
                "Per informazioni scrivete a {email}."],
    ),
    "personale": dict(
        informal=0.5,
        templates=[
            ("Richiesta ferie|Ferie",
             "vorrei chiedere [[le ferie|un periodo di ferie]] {date:dal} {date2:al} compresi. Durante la "
             "mia assenza le pratiche urgenti saranno seguite da {p1}."),
            ("Colloquio di lavoro|Invito a colloquio",
             "la ringraziamo per aver inviato la sua candidatura per la posizione di {position}. La "
             "invitiamo a un colloquio presso la nostra sede di {city} {date:il} alle {time}."),
            ("Benvenuto in azienda|Nuovo collega",
             "diamo il benvenuto a {p1}, che {date:dal} entrerà nel team {dept_del} di {city}. Vi chiedo di "
             "aiutarl{g:p1:o:a} nelle prime settimane."),
            ("Busta paga|Straordinari non pagati",
             "nella busta paga di {month} non risultano le ore di straordinario. Potete verificare? Per "
             "rispondere potete scrivere a {email} oppure chiamare il {phone}."),
            ("Assenza per malattia|Malattia",
             "ti comunico che {date:da} sarò assente per malattia; il certificato medico è già stato "
             "inviato all'INPS. Per urgenze puoi rivolgerti a {p1}."),
            ("Corso di formazione|Formazione sicurezza",
             "è aperta l'iscrizione al corso di formazione sulla sicurezza che si terrà a {city} {date:il}. "
             "Il costo per partecipante è di {money:s} ed è interamente a carico di {org}."),
            ("Dimissioni|Lettera di dimissioni",
             "con la presente rassegno le mie dimissioni dalla posizione di {position} presso {org}. Nel "
             "rispetto del preavviso, il mio ultimo giorno di lavoro sarà {date:il}."),
        ],
        extras=["Resto a disposizione per qualsiasi chiarimento.", "Grazie per la comprensione.",
                "I moduli sono disponibili nella intranet aziendale."],
    ),
    "preventivo": dict(
        templates=[
            ("Richiesta di preventivo",
             "vi chiediamo un preventivo per la fornitura di {qty} {product} con consegna a {city}. "
             "[[Ci servirebbe entro|Avremmo bisogno della merce entro]] {date:il}."),
            ("Preventivo {ordno}|Offerta commerciale",
             "come da accordi vi inviamo il preventivo per {qty} {product}: il totale ammonta a {money} più "
             "IVA, con consegna inclusa a {city}. L'offerta è valida fino {date:al}."),
            ("Richiesta sconto|Preventivo: condizioni",
             "abbiamo ricevuto il vostro preventivo di {money}, ma un altro fornitore ci ha proposto "
             "condizioni migliori. Sareste disposti a concedere uno sconto del 10% se l'ordine venisse "
             "confermato entro {date:il}?"),
        ],
        extras=["I prezzi si intendono franco destino.", "Il pagamento è previsto a 60 giorni data fattura.",
                "Per dettagli tecnici contattate {p2} al {phone2}."],
    ),
    "informatica": dict(
        templates=[
            ("Manutenzione server|Gestionale non disponibile",
             "vi informiamo che {wdate} dalle 20:00 alle 23:00 i server di {org} saranno in manutenzione e "
             "il gestionale non sarà raggiungibile."),
            ("Reset password|Accesso portale fornitori",
             "per reimpostare la password del portale fornitori scrivete a {email} oppure chiamate l'help "
             "desk al {phone}, dal lunedì al venerdì."),
            ("Problema accesso|Posta non funzionante",
             "da {date:il} non riesco ad accedere alla posta aziendale da {city}. Il tecnico {p1} mi ha "
             "detto di rivolgermi a voi: potete aiutarmi?"),
            ("Nuovo gestionale",
             "{date:da} passeremo al nuovo gestionale fornito da {org3}. La formazione per gli utenti si "
             "terrà nella sede di {city}; riceverete a breve il calendario delle sessioni."),
        ],
        extras=["Ci scusiamo per il disagio.",
                "Vi preghiamo di salvare il vostro lavoro prima dell'orario indicato."],
    ),
    "contratto": dict(
        templates=[
            ("Rinnovo contratto|Contratto in scadenza",
             "il contratto di fornitura tra {org} e {rorg} scadrà {date:il}. Vi proponiamo di rinnovarlo "
             "alle stesse condizioni, con un canone annuo di {money}."),
            ("Contratto da firmare",
             "vi inviamo in allegato il contratto da firmare. Una volta sottoscritto, vi preghiamo di "
             "restituirlo a {email} entro {date:il}. Per dubbi sulle clausole contattate lo {lawfirm}."),
            ("Disdetta contratto",
             "con la presente vi comunichiamo la disdetta del contratto di manutenzione con decorrenza "
             "{date:dal}, come previsto dall'articolo 8. Le attività presso la sede di {city} "
             "proseguiranno fino a quella data."),
        ],
        extras=["Restiamo a disposizione per un incontro di chiarimento."],
    ),
    "evento": dict(
        templates=[
            ("Invito in fiera|Ci vediamo in fiera",
             "saremo presenti alla fiera di {city} {date:dal} {date2:al}, padiglione 4, e saremmo lieti di "
             "incontrarvi al nostro stand per presentarvi le novità di {org}."),
            ("Cena aziendale|Cena di fine anno",
             "la cena aziendale di fine anno si terrà {wdate} alle 20:00 presso il ristorante {restaurant} "
             "di {city}. Conferma la tua presenza a {p1} entro {date2:il}."),
            ("Invito all'evento|Presentazione nuovo catalogo",
             "{org} è lieta di invitarvi alla presentazione del nuovo catalogo, {wdate} alle {time} presso "
             "la nostra sede di {city}. La partecipazione è gratuita ma è necessario registrarsi scrivendo "
             "a {email}."),
        ],
        extras=["Seguirà un aperitivo.", "Il parcheggio è disponibile all'interno dello stabilimento."],
    ),
    "anagrafica": dict(
        templates=[
            ("Aggiornamento dati aziendali|Variazione sede legale",
             "vi informiamo che {org} ha trasferito la sede legale a {city}. I nuovi recapiti sono: "
             "telefono {phone}, email {email}. Restano invariati partita IVA e coordinate bancarie."),
            ("Nuovo fornitore|Registrazione fornitore",
             "per completare la vostra registrazione come fornitori di {rorg} vi chiediamo di inviarci la "
             "visura camerale, l'IBAN del conto dedicato e il nome del referente commerciale."),
            ("Dati per la registrazione|Scheda fornitore",
             "ecco i dati per la registrazione: ragione sociale {org}, sede a {city}, IBAN {iban}, "
             "referente {p1}, telefono {phone}."),
        ],
        extras=["Grazie per la collaborazione."],
    ),
    "trasferta": dict(
        informal=0.3,
        templates=[
            ("Nota spese trasferta|Nota spese",
             "ti invio la nota spese della trasferta a {city} {date:del}: treno, albergo e due pranzi per "
             "un totale di {money:s}. Le ricevute sono in allegato."),
            ("Prenotazione hotel|Richiesta prenotazione",
             "vi chiedo di prenotare una camera a {city} per la notte {date:del}, vicino alla sede di "
             "{rorg}. Il budget massimo approvato da {p1} è di {money:s} a notte."),
            ("Rimborso spese",
             "il rimborso delle spese di {month} per {money:s} vi sarà accreditato con lo stipendio. Per "
             "domande scrivete all'ufficio personale, {email}."),
        ],
        extras=["Le spese di taxi sono rimborsabili solo con ricevuta."],
    ),
}
TU = re.compile(r"\b(ti|tua|tuo|puoi)\b|Conferma la tua")
GENERIC_EXTRAS = [
    "Restiamo a disposizione per qualsiasi chiarimento.", "Vi ringraziamo per la collaborazione.",
    "Vi prego di confermare la ricezione di questa email.",
    "Per informazioni potete contattare {p2} al {phone2}.", "Grazie dell'attenzione.",
    "Per velocizzare la pratica vi chiedo di rispondere entro {date3:il}.",
    "Vi ricordo che i nostri uffici di {city3} resteranno chiusi per inventario {date3:il}.",
]

# ----------------------------------------------------------------------------------------------------
# the generator


@dataclass
class Email:
    text: str
    entities: list[tuple[str, str]]  # (span, TYPE), distinct, in order of first appearance
    starts: list[int]  # where each entity was written in `text` (its first occurrence)
    category: str
    template: int  # index of the body template within its category

    def output_text(self) -> str:
        return "\n".join(f"{span}: {kind}" for span, kind in self.entities)


@dataclass
class Person:
    first: str
    last: str
    female: bool


def ascii_slug(text: str, sep: str = "") -> str:
    """'Niccolò D'Angelo' -> 'niccolodangelo' (for email addresses and domains)."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", sep, plain).strip(sep)


class EmailFactory:
    """Renders one email at a time; all randomness flows from `rng` and the seeded Faker instance."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fake = Faker("it_IT")
        self.fake.seed_instance(seed)
        # every body template equally likely (not every category)
        self.templates = [(c, i) for c, spec in CATEGORIES.items() for i in range(len(spec["templates"]))]

    # ------------------------------------------------------------------ one email
    def email(self) -> Email:
        rng = self.rng
        category, index = rng.choice(self.templates)
        spec = CATEGORIES[category]
        subjects, body = spec["templates"][index]
        # bodies written with "tu" always get a first-name greeting; others sometimes do
        informal = bool(TU.search(body)) or rng.random() < spec.get("informal", 0.0)
        body = self._phrase(body)
        sentences = []
        if rng.random() < 0.25:
            opener = rng.choice(OPENERS_INFORMAL if informal else OPENERS)
            if opener.endswith(","):  # "Come anticipato al telefono, vi confermiamo..."
                body = f"{opener} {body}"
            else:
                sentences.append(opener)
                body = body[:1].upper() + body[1:]
        sentences.append(body)
        extras = spec["extras"] + GENERIC_EXTRAS
        for _ in range(rng.choice([0, 0, 1, 1, 1, 2])):
            extra = rng.choice(extras)
            if extra not in sentences:
                sentences.append(extra)
        parts = []
        if rng.random() < 0.45:
            parts.append("Oggetto: " + rng.choice(subjects.split("|")) + "\n\n")
        parts.append(rng.choice(GREETINGS_INFORMAL if informal else GREETINGS_FORMAL))
        parts.append(rng.choice(["\n\n", "\n"]))
        parts.append(rng.choice([" ", " ", "\n", "\n\n"]).join(sentences))
        parts.append(rng.choice(["\n\n", "\n"]))
        parts.append(rng.choice(CLOSINGS_INFORMAL if informal else CLOSINGS) + "\n")
        parts.append(rng.choice(SIGNATURES_INFORMAL if informal else SIGNATURES))
        text, entities, starts = self._render("".join(parts))
        return Email(text=text, entities=entities, starts=starts, category=category, template=index)

    def _phrase(self, template: str) -> str:
        """Resolve every [[a|b|c]] phrasing alternative."""
        return re.sub(r"\[\[(.*?)\]\]", lambda m: self.rng.choice(m.group(1).split("|")), template)

    def _render(self, template: str) -> tuple[str, list[tuple[str, str]], list[int]]:
        """Fill the slots, recording each entity as it is written (so it is verbatim by construction)."""
        self.slots: dict[str, list[tuple[str, str | None]]] = {}
        self.people: dict[str, Person] = {}
        self.values: dict[str, object] = {}
        out: list[str] = []
        found: list[tuple[str, str]] = []
        starts: list[int] = []
        pos = 0
        for literal, field, fspec, _ in string.Formatter().parse(template):
            if literal.startswith(".") and out and out[-1].endswith("."):  # "S.r.l." + "." -> one period
                literal = literal[1:]
            out.append(literal)
            pos += len(literal)
            if field is None:
                continue
            segments = self._slot(field, fspec or "")
            head, kind = segments[0]
            before = "".join(out[-2:])
            if kind is None and (not before or before.endswith((". ", "? ", "! ", "\n"))):  # "Dal 3 marzo"
                segments = [(head[:1].upper() + head[1:], None), *segments[1:]]
            for value, kind in segments:
                if kind is not None and (value, kind) not in found:
                    found.append((value, kind))
                    starts.append(pos)
                out.append(value)
                pos += len(value)
        return "".join(out), found, starts

    # ------------------------------------------------------------------ slots
    def _slot(self, field: str, fspec: str) -> list[tuple[str, str | None]]:
        if field == "g":  # gender agreement: {g:who:male form:female form}
            who, male, female = fspec.split(":")
            return [(female if self._person(who).female else male, None)]
        if field.startswith("date") or field.startswith("wdate"):
            return self._date(field, fspec)
        if field.startswith("money") and field not in self.slots:
            self.slots[field] = [(self._money(field, fspec), "MONEY")]
        key = field
        if key not in self.slots:
            self.slots[key] = self._make(field)
        return self.slots[key]

    def _person(self, who: str) -> Person:
        if who not in self.people:
            female = self.rng.random() < 0.5
            first = self.fake.first_name_female() if female else self.fake.first_name_male()
            last = self.fake.last_name()
            used = {p.last for p in self.people.values()}
            while last in used:
                last = self.fake.last_name()
            self.people[who] = Person(first, last, female)
        return self.people[who]

    def _org_name(self, key: str) -> str:
        if key not in self.values:
            rng = self.rng
            last, last2 = self.fake.last_name(), self.fake.last_name()
            brand = rng.choice(BRAND_HEADS) + rng.choice(BRAND_TAILS)
            legal = rng.choice(LEGAL)
            name = rng.choice([
                f"{last} {rng.choice(SECTORS)} {legal}", f"{brand} {legal}",
                f"{rng.choice(SECTORS)} {last} {legal}",
                f"{last} & {last2} {legal}", f"{brand} Italia {legal}", f"Gruppo {last}", f"{last} {legal}",
                f"Officine {last} {legal}", f"{brand}", f"Cooperativa {brand}",
            ])
            self.values[key] = name
        return self.values[key]  # type: ignore[return-value]

    def _make(self, field: str) -> list[tuple[str, str | None]]:
        rng = self.rng
        people = {"rcpt": "rcpt", "sender": "sender", "p1": "p1", "p2": "p2"}
        base, _, form = field.partition("_")
        if base in people:
            p = self._person(base)
            if form == "":
                return [(f"{p.first} {p.last}", "PER")]
            if form == "first":
                return [(p.first, "PER")]
            if form == "title":
                return [(rng.choice(TITLES_F if p.female else TITLES_M) + " ", None), (p.last, "PER")]
            if form == "email":
                org = self._org_name("org") if base == "sender" else self._org_name("rorg")
                local = rng.choice([f"{ascii_slug(p.first)}.{ascii_slug(p.last)}",
                                    f"{ascii_slug(p.first)[:1]}.{ascii_slug(p.last)}", ascii_slug(p.last)])
                return [(f"{local}@{self._domain(org)}", "EMAIL")]
        if field in ("org", "rorg", "org3"):
            return [(self._org_name(field), "ORG")]
        if field == "courier":
            return [(rng.choice(COURIERS), "ORG")]
        if field == "bank":
            return [(rng.choice(BANKS), "ORG")]
        if field == "lawfirm":
            last = self.fake.last_name()
            return [(rng.choice([f"Studio Legale {last}", f"Studio Legale {last} & Associati",
                                 f"Avvocati Associati {last}"]), "ORG")]
        if field == "restaurant":
            kind = rng.choice(["Da ", "Trattoria ", "Osteria ", "Ristorante "])
            return [(kind + self.fake.first_name_male(), "ORG")]
        if field.startswith("city"):
            city = rng.choice(BIG_CITIES) if rng.random() < 0.6 else rng.choice(TOWNS)
            used = {s[0][0] for k, s in self.slots.items() if k.startswith("city")}
            while city in used:
                city = rng.choice(BIG_CITIES)
            return [(city, "LOC")]
        if field == "email":
            org = self._org_name(rng.choice(["org", "rorg"]))
            box = rng.choice(["info", "amministrazione", "ordini", "acquisti", "segreteria", "hr", "fatture",
                              "supporto", "logistica", "ufficio.personale"])
            return [(f"{box}@{self._domain(org)}", "EMAIL")]
        if field in ("phone", "phone2"):
            return [(self._phone(mobile=rng.random() < 0.3), "PHONE")]
        if field == "mobile":
            return [(self._phone(mobile=True), "PHONE")]
        if field == "iban":
            iban = self.fake.iban()
            if rng.random() < 0.5:
                iban = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
            return [(iban, "IBAN")]
        if field == "inv":
            n, year = rng.randint(1, 2999), rng.choice([2024, 2025, 2026])
            return [(rng.choice([f"FT-{year}/{n:04d}", f"{n}/{year}", f"{year}/{n:05d}",
                                 f"FT {n}/{year % 100}", f"A/{n:04d}/{year % 100}"]), "INVOICE")]
        # fillers: never entities
        if field == "ordno":
            n = rng.randint(1000, 99999)
            year = rng.choice([2024, 2025, 2026])
            return [(rng.choice([f"n. {n}", f"ORD-{n}", f"PO-{year}-{n % 10000:04d}", f"n. {n}/B"]), None)]
        if field == "qty":
            return [(str(rng.choice([2, 3, 5, 8, 10, 12, 15, 20, 24, 30, 40, 50, 60, 80, 100, 120, 150, 200,
                                     250, 300, 500])), None)]
        if field == "product":
            return [(rng.choice(PRODUCTS), None)]
        if field == "time":
            return [(rng.choice(TIMES), None)]
        if field == "role":
            return [(rng.choice(ROLES), None)]
        if field == "position":
            return [(rng.choice(POSITIONS), None)]
        if field == "dept":
            return [(rng.choice(DEPTS), None)]
        if field == "dept_del":
            dept = rng.choice(DEPTS)
            return [(("dell'" if dept[0] in "aeiou" else "della " if dept.endswith("a") else "del ") + dept,
                     None)]
        if field == "month":
            return [(rng.choice(MONTHS), None)]
        if field == "tracking":
            digits = "".join(rng.choice(string.digits) for _ in range(12))
            return [(rng.choice([f"{digits[:4]} {digits[4:8]} {digits[8:]}", f"1Z{digits}",
                                 f"TRK-{digits[:8]}"]), None)]
        raise KeyError(f"unknown template slot {{{field}}}")

    def _domain(self, org: str) -> str:
        skip = {"s.r.l", "s.p.a", "srl", "spa", "s.r.l.s", "s.n.c", "s.a.s", "gruppo", "italia",
                "cooperativa"}
        words = [w for w in re.split(r"[\s&]+", org) if w and w.lower().rstrip(".") not in skip]
        slug = ascii_slug(" ".join(words[:2]), sep=self.rng.choice(["", "-"])) or "azienda"
        return slug + self.rng.choice([".it", ".it", ".com", ".eu"])

    def _phone(self, mobile: bool) -> str:
        rng = self.rng
        if mobile:
            p, n = rng.choice(MOBILE), "".join(rng.choice(string.digits) for _ in range(7))
            return rng.choice([f"+39 {p} {n[:3]} {n[3:]}", f"{p} {n}", f"{p}.{n[:3]}.{n[3:]}", f"+39 {p}{n}",
                               f"{p} {n[:3]} {n[3:]}"])
        area = rng.choice(AREA_CODES)
        n = str(rng.randint(2, 9)) + "".join(rng.choice(string.digits) for _ in range(9 - len(area)))
        return rng.choice([f"+39 {area} {n[:4]} {n[4:]}", f"{area} {n}", f"{area}-{n}", f"+39 {area} {n}",
                           f"{area} {n[:3]} {n[3:]}"])

    def _money(self, field: str, fspec: str) -> str:
        """An amount in one of the usual Italian spellings; `fspec`: s = small, less / third = of {money}."""
        rng = self.rng
        if fspec == "less":
            amount = round(self.values["money"] * rng.uniform(0.7, 0.95), 2)  # type: ignore[operator]
        elif fspec == "third":
            amount = round(self.values["money"] / 3, 2)  # type: ignore[operator]
        else:
            scale = rng.choice([30, 100, 300] if fspec == "s" else [100, 500, 1500, 8000, 40000])
            amount = round(rng.uniform(scale * 0.3, scale * 2), rng.choice([0, 2]))
        self.values[field] = amount
        cents = not float(amount).is_integer() or rng.random() < 0.5
        whole = f"{int(amount):,}".replace(",", ".")
        num = whole + (f",{round(amount * 100) % 100:02d}" if cents else "")
        return rng.choice([f"€ {num}", f"{num} €", f"{num} euro", f"EUR {num}", f"€{num}", f"{num} Euro"])

    def _date(self, field: str, fspec: str) -> list[tuple[str, str | None]]:
        """date < date2 < date3 in one email; `fspec` is the preposition before it (il, dal, al...)."""
        rng = self.rng
        if "date0" not in self.values:
            self.values["date0"] = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))
            self.values["datefmt"] = rng.choice(["long", "long", "short", "num", "num0", "dots"])
        base: dt.date = self.values["date0"]  # type: ignore[assignment]
        order = {"date": 0, "wdate": 0, "date2": 1, "wdate2": 1, "date3": 2}[field]
        key = f"d{order}"
        if key not in self.values:
            day = base + dt.timedelta(days=order * rng.randint(3, 25))
            if day.weekday() >= 5:  # business mail: weekend dates move to the next Monday
                day += dt.timedelta(days=7 - day.weekday())
            self.values[key] = day
        day: dt.date = self.values[key]  # type: ignore[assignment]
        if field.startswith("wdate"):
            text = f"{WEEKDAYS[day.weekday()]} {day.day} {MONTHS[day.month - 1]}"
            return [(text, "DATE")]
        fmt = self.values["datefmt"]
        text = {
            "long": f"{day.day}{'°' if day.day == 1 else ''} {MONTHS[day.month - 1]} {day.year}",
            "short": f"{day.day}{'°' if day.day == 1 else ''} {MONTHS[day.month - 1]}",
            "num": f"{day.day}/{day.month}/{day.year}",
            "num0": f"{day.day:02d}/{day.month:02d}/{day.year}",
            "dots": f"{day.day:02d}.{day.month:02d}.{day.year}",
        }[fmt]
        if not fspec:
            return [(text, "DATE")]
        elided = text.startswith(("8 ", "8/", "11 ", "11/"))  # l'8 marzo, dall'11 aprile
        fspec = "dal" if fspec == "da" else fspec  # "{date:da} sarò assente" -> "dal 3 marzo sarò assente"
        prep = {"il": "l'", "dal": "dall'", "al": "all'", "del": "dell'", "per il": "per l'"}
        return [(prep[fspec] if elided else fspec + " ", None), (text, "DATE")]


def generate(n: int, seed: int) -> list[Email]:
    factory = EmailFactory(seed)
    return [factory.email() for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# threads: the pretraining corpus also holds replies that quote and re-mention earlier emails

# A bottom- or top-posted reply names again what the quoted email said. Real mail is full of such
# repetition, and it is the signal from which a language model can learn to copy a span it has read
# earlier in the context (the "induction heads" of Olsson et al., 2022), which extraction needs.
# Measured: within the demo's CPU pretraining budget it is not enough on its own; the base still does
# not copy (docs/DESIGN-NOTES.md, "The demo"). Replies carry no labels: plain text like any email.
REPLY_MENTIONS = {
    "PER": ["Ho girato la richiesta a {x}.", "Ho sentito {x} e per noi va bene.",
            "Potete mettere in copia anche {x}?", "Ne parlo con {x} e vi faccio sapere."],
    "ORG": ["Ho aggiornato la scheda di {x}.", "Ne ho parlato con i colleghi di {x}.",
            "Per {x} confermiamo le condizioni.", "Il referente di {x} è stato avvisato."],
    "LOC": ["Per noi {x} va benissimo.", "Quindi la sede è {x}, giusto?", "Confermo la tappa di {x}."],
    "DATE": ["Segno in agenda: {x}.", "Confermo la data: {x}.", "Per la scadenza del {x} ci siamo."],
    "EMAIL": ["Scriverò anche a {x}.", "Ho aggiunto {x} alla rubrica.", "L'indirizzo {x} è corretto."],
    "PHONE": ["Vi chiamo al {x} in mattinata.", "Il numero {x} risulta occupato, riprovo.",
              "Ho salvato il numero {x}."],
    "MONEY": ["L'importo di {x} è corretto.", "Confermo la cifra: {x}.", "Su {x} siamo d'accordo."],
    "IBAN": ["Ho passato l'IBAN {x} all'amministrazione.", "L'IBAN {x} risulta verificato."],
    "INVOICE": ["La fattura {x} è stata registrata.", "Ho ritrovato la fattura {x}.",
                "Sulla fattura {x} non ci sono problemi."],
}
REPLY_OPENERS = ["Grazie per la mail.", "Ricevuto, grazie.", "Perfetto, grazie.", "Tutto chiaro.",
                 "Ho letto con attenzione.", "Grazie del riepilogo."]


def reply_text(factory: EmailFactory, original: Email) -> str:
    """An unlabelled thread around `original`: a reply that re-mentions its entities, and `original`
    quoted in one of three real-mail layouts: top-posting (reply, then the original as Outlook quotes
    it), bottom-posting ("> " quote, then the reply), or a conversation export (the original message,
    then the reply, which quotes it again in full)."""
    rng, fake = factory.rng, factory.fake
    people = [span for span, kind in original.entities if kind == "PER"]
    addresses = [span for span, kind in original.entities if kind == "EMAIL"]
    writer = f"{fake.first_name()} {fake.last_name()}"
    author = people[-1] if people else f"{fake.first_name()} {fake.last_name()}"  # usually the signer
    picked = rng.sample(original.entities, k=min(len(original.entities), rng.randint(2, 4)))
    lines = [rng.choice(REPLY_MENTIONS[kind]).format(x=span) for span, kind in picked]
    body = " ".join([rng.choice(REPLY_OPENERS), *lines]) if rng.random() < 0.7 else "\n".join(lines)
    greeting = rng.choice([f"Gentile {author},", f"Buongiorno {author},", "Buongiorno,", f"Ciao {author},"])
    reply = f"{greeting}\n{body}\n{rng.choice(CLOSINGS_INFORMAL + CLOSINGS)}\n{writer}"
    day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))
    when = f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    sender = f"{author} <{addresses[0]}>" if addresses else author
    outlook = f"-----Messaggio originale-----\nDa: {sender}\nInviato: {when}\nOggetto: R: richiesta\n\n"
    layout = rng.random()
    if layout < 0.25:  # top-posting
        return f"{reply}\n\n{outlook}{original.text}"
    if layout < 0.5:  # bottom-posting
        quoted = "\n".join("> " + line if line else ">" for line in original.text.split("\n"))
        return f"Il {when} {sender} ha scritto:\n{quoted}\n\n{reply}"
    return (f"Da: {sender}\nData: {when}\n\n{original.text}\n\n"  # conversation export
            f"Da: {writer}\nData: {when}\n\n{reply}\n\n{outlook}{original.text}")


# Lists that a reply walks through again: invoices to pay, contacts to update, participants to
# confirm. Their codes, numbers and names are the densest copyable text real mail has.
LIST_KINDS = {
    "fatture": ("Vi riepilogo le fatture ancora aperte:", "{inv} del {date}, {money}",
                "Ecco la situazione aggiornata:", "{inv}: {money} pagati il {date2}"),
    "contatti": ("Ti giro i contatti aggiornati dei fornitori:", "{name} ({org}) - tel. {phone} - {email}",
                 "Ho aggiornato la rubrica:", "{name}, {org}: {phone}, {email}"),
    "partecipanti": ("Questi i partecipanti alla riunione del {date}:", "{name}, {org}, sede di {city}",
                     "Confermati:", "{name} ({org}) da {city}"),
    "bonifici": ("Di seguito i bonifici da disporre entro il {date}:", "{money} a {org}, IBAN {iban}",
                 "Bonifici eseguiti:", "{org}: {money} sull'IBAN {iban}"),
}


def list_thread(factory: EmailFactory) -> str:
    """A list email and a reply that goes through the same items again, in the same order."""
    rng, fake = factory.rng, factory.fake
    intro, item, reply_intro, reply_item = LIST_KINDS[rng.choice(sorted(LIST_KINDS))]
    day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))
    date = f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    rows = []
    for _ in range(rng.randint(3, 7)):
        factory.values = {}
        first, last = fake.first_name(), fake.last_name()
        org = factory._org_name("org")
        later = day + dt.timedelta(days=rng.randint(1, 20))
        rows.append(dict(
            name=f"{first} {last}", org=org, phone=factory._phone(mobile=rng.random() < 0.4),
            email=f"{ascii_slug(first)}.{ascii_slug(last)}@{factory._domain(org)}",
            inv=factory._make("inv")[0][0], money=factory._money("money", ""),
            iban=factory._make("iban")[0][0],
            city=rng.choice(BIG_CITIES), date=f"{later.day}/{later.month}/{later.year}",
            date2=f"{later.day + 1 if later.day < 28 else 1}/{later.month}/{later.year}"))
    sender, writer = (f"{fake.first_name()} {fake.last_name()}" for _ in range(2))
    first = "\n".join([rng.choice(["Buongiorno,", "Ciao a tutti,", "Gentili colleghi,"]),
                       intro.format(date=date), *("- " + item.format(**r) for r in rows),
                       rng.choice(CLOSINGS), sender])
    kept = [r for r in rows if rng.random() < 0.85] or rows[:1]
    items = ("- " + reply_item.format(**r) for r in kept)
    reply = "\n".join([f"Ciao {sender.split()[0]},", reply_intro, *items,
                       rng.choice(CLOSINGS_INFORMAL), writer])
    return f"Da: {sender}\nData: {date}\n\n{first}\n\nDa: {writer}\nData: {date}\n\n{reply}"


def generate_unlabelled(n: int, seed: int) -> list[str]:
    """Pretraining texts: plain emails (30%), replies quoting one (45%), list threads (25%)."""
    factory = EmailFactory(seed)
    texts = []
    for _ in range(n):
        kind = factory.rng.random()
        if kind < 0.25:
            texts.append(list_thread(factory))
            continue
        original = factory.email()
        texts.append(reply_text(factory, original) if kind < 0.7 else original.text)
    return texts


# ----------------------------------------------------------------------------------------------------
# files


def write_csv(emails: list[Email], path: Path) -> None:
    """`input_text,output_text` (the seeds' columns), UTF-8, \\n line ends, multi-line cells quoted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["input_text", "output_text"])
    for e in emails:
        writer.writerow([e.text, e.output_text()])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue().encode("utf-8"))


def write_jsonl(texts: list[str], path: Path) -> None:
    """One `{"text": ...}` object per line: the loop's text-column mode reads it (data.text_column: text).

    Written to a temporary file and renamed, so a crash never leaves a truncated corpus under `path`
    for a later `make_demo_model.py --resume` to train on."""
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "data")
    ap.add_argument("--rows", type=int, default=LABELLED_ROWS, help="labelled emails (emails.csv)")
    ap.add_argument("--seed", type=int, default=LABELLED_SEED)
    ap.add_argument("--unlabelled-rows", type=int, default=UNLABELLED_ROWS,
                    help="unlabelled emails for pretraining (emails_unlabelled.jsonl); 0 = skip")
    ap.add_argument("--unlabelled-seed", type=int, default=UNLABELLED_SEED)
    args = ap.parse_args(argv)
    if args.seed == args.unlabelled_seed:
        ap.error("--seed and --unlabelled-seed must differ (pretraining texts must not be the test data)")
    import faker

    if faker.VERSION != FAKER_VERSION:
        print(f"note: Faker {faker.VERSION} (the committed files used {FAKER_VERSION}); output may differ")
    out = args.out_dir / "emails.csv"
    write_csv(generate(args.rows, args.seed), out)
    print(f"{out}: {args.rows} rows, sha256 {sha256(out)}")
    if args.unlabelled_rows:
        out = args.out_dir / "emails_unlabelled.jsonl"
        write_jsonl(generate_unlabelled(args.unlabelled_rows, args.unlabelled_seed), out)
        print(f"{out}: {args.unlabelled_rows} texts, sha256 {sha256(out)}")


if __name__ == "__main__":
    main()
